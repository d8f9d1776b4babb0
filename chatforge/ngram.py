"""An interpolated Kneser-Ney n-gram baseline over token ids, scored in bits per byte.

The formulas are nltk.lm's `KneserNeyInterpolated` (raw counts at the highest order, continuation
counts below, absolute discount `d`), computed from precomputed count tables: nltk recounts
continuations by scanning every n-gram type on each query, which takes minutes for a few thousand
tokens. One change: nltk's lowest order gives probability 0 to a token never seen in training (an
infinite loss); here the unigram level is itself interpolated with the uniform distribution over the
vocabulary (Chen & Goodman), so every token has a finite cost. tests/test_pretrain.py checks the
result against nltk.lm with that same lowest order.

Each record is scored as `<s>`*(order-1), its tokens, then end-of-text, which is predicted too:
the language model's bits per byte count its end-of-text predictions the same way.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable, Sequence

START = -1  # left padding symbol; never a token id, never predicted


class KneserNeyLM:
    def __init__(self, order: int, vocab_size: int, end_id: int, discount: float = 0.75):
        if order < 2:
            raise ValueError("order must be at least 2")
        if not 0.0 < discount <= 1.0:
            raise ValueError("discount must be in (0, 1]")
        self.order, self.vocab_size, self.end_id, self.discount = order, vocab_size, end_id, discount
        # counts[k][context][word] for n-grams of length k = 1..order (context = the first k-1 symbols).
        self.counts: list[dict[tuple, Counter]] = [defaultdict(Counter) for _ in range(order + 1)]
        # continuations[k][context][word] = number of distinct symbols seen before (context, word), k < order.
        self.continuations: list[dict[tuple, Counter]] = [defaultdict(Counter) for _ in range(order)]
        self.continuation_totals: list[dict[tuple, int]] = [{} for _ in range(order)]

    def padded(self, tokens: Sequence[int]) -> list[int]:
        return [START] * (self.order - 1) + list(tokens) + [self.end_id]

    def fit(self, records: Iterable[Sequence[int]]) -> "KneserNeyLM":
        for tokens in records:
            symbols = self.padded(tokens)
            for length in range(1, self.order + 1):
                for end in range(length, len(symbols) + 1):
                    gram = tuple(symbols[end - length:end])
                    self.counts[length][gram[:-1]][gram[-1]] += 1
        for length in range(1, self.order):
            for context, followers in self.counts[length + 1].items():
                shorter = context[1:]
                for word in followers:
                    self.continuations[length][shorter][word] += 1
            self.continuation_totals[length] = {
                context: sum(words.values()) for context, words in self.continuations[length].items()
            }
        return self

    def probability(self, word: int, context: Sequence[int]) -> float:
        context = tuple(context[max(0, len(context) - self.order + 1):])
        return self._interpolated(word, context)

    def _interpolated(self, word: int, context: tuple) -> float:
        length = len(context) + 1
        if not context:  # lowest order: continuation counts, interpolated with the uniform distribution
            words = self.continuations[1][()]
            total = self.continuation_totals[1][()]
            alpha = max(words.get(word, 0) - self.discount, 0.0) / total
            return alpha + self.discount * len(words) / total / self.vocab_size
        followers = self.counts[length].get(context)
        if length == self.order:
            count, total = (followers[word], sum(followers.values())) if followers else (0, 0)
        else:
            count = self.continuations[length].get(context, {}).get(word, 0)
            total = self.continuation_totals[length].get(context, 0)
        if not followers or total == 0:  # unseen context: defer to the shorter one
            return self._interpolated(word, context[1:])
        alpha = max(count - self.discount, 0.0) / total
        gamma = self.discount * len(followers) / total
        return alpha + gamma * self._interpolated(word, context[1:])

    def record_nats(self, tokens: Sequence[int]) -> tuple[float, int]:
        """Negative log-likelihood (nats) of a record and its end-of-text, and how many symbols that is."""
        symbols = self.padded(tokens)
        history = self.order - 1
        nats = 0.0
        for position in range(history, len(symbols)):
            nats -= math.log(self.probability(symbols[position], symbols[position - history:position]))
        return nats, len(symbols) - history

