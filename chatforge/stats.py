"""Small statistics shared by training and evaluation: intervals, distinct-n, bits per byte, pair accuracy."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default); (0, 1) when trials == 0."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # exact ends at 0 and n successes (the formula leaves a rounding crumb there)
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == trials else centre + half)


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all word n-grams across the texts (0 when there are none)."""
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Tokenizer-independent loss: nats over the text converted to bits, per UTF-8 byte of that text."""
    return total_nats / math.log(2) / total_bytes if total_bytes else float("nan")


def pair_accuracy(pairs: list[dict], correct: list[bool]) -> dict:
    """Share of pairs a model orders right (chosen above rejected): overall, per origin and per origin/strategy,
    as reports/reward.json and reports/dpo.json give it."""
    groups = defaultdict(list)
    for pair, right in zip(pairs, correct):
        meta = pair.get("meta", {})
        origin, strategy = meta.get("origin", "unknown"), meta.get("strategy", "unknown")
        for key in (origin, f"{origin}/{strategy}"):
            groups[key].append(right)
    return {
        "accuracy": round(sum(correct) / len(correct), 4),
        "accuracy_by_origin": {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items()) if "/" not in k},
        "accuracy_by_strategy": {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items()) if "/" in k},
        "pairs_by_strategy": {k: len(v) for k, v in sorted(groups.items()) if "/" in k},
    }
