"""From the engine's tokens to the text of each choice: incremental decoding, stop sequences, finish reasons,
and OpenAI's `logprobs` entries.

Runs on the event loop, the only thread that touches the tokenizer. A choice whose text reaches a stop
sequence is cancelled at once, so its row leaves the batch at the next step; so are the rows of a consumer
that stops listening (a client gone).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from chatforge.inference.generate import IncrementalDecoder
from chatforge.inference.sampling import SamplingParams, TokenLogprob
from chatforge.serving.engine import Request
from chatforge.tokenization import TokenBytes

LOGPROB_FLOOR = -9999.0  # OpenAI's value for a negligible probability (JSON has no -Infinity)


class StopMatcher:
    """Cuts text at the first stop sequence; while streaming, holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buffer = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is safe to emit now (never part of a stop sequence)."""
        self.buffer += piece
        hits = [index for stop in self.stops if (index := self.buffer.find(stop)) >= 0]
        if hits:
            self.stopped = True
            text, self.buffer = self.buffer[: min(hits)], ""
            return text
        keep = next(
            (size for size in range(min(len(self.buffer), max(map(len, self.stops), default=1) - 1), 0, -1)
             if any(stop.startswith(self.buffer[-size:]) for stop in self.stops)),
            0,
        )
        text, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return text

    def flush(self) -> str:
        text, self.buffer = self.buffer, ""
        return text


@dataclass
class Piece:
    index: int  # which choice
    text: str  # may be empty (a token that completes no character yet)
    finish: str | None  # "stop" | "length" on a choice's last piece
    tokens: int  # tokens this choice has generated so far (its end-of-turn token included)
    logprobs: list[dict] | None = None  # OpenAI's `logprobs.content` entries of this piece's token, if asked


def logprob_entry(token_bytes: TokenBytes, token: int, scored: TokenLogprob) -> dict:
    """`choices[i].logprobs.content[j]` as OpenAI gives it: the token, its logprob and bytes, and the best
    alternatives in the same shape."""

    def described(token_id: int, logprob: float) -> dict:
        raw = token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, LOGPROB_FLOOR),
                "bytes": list(raw)}

    return {**described(token, scored.logprob), "top_logprobs": [described(*pair) for pair in scored.top]}


class _Choice:
    def __init__(self, index: int, request: Request, tokenizer, stops: list[str], token_bytes: TokenBytes):
        self.index, self.request = index, request
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stops)
        self.token_bytes = token_bytes
        self.tokens = 0

    def take(self, token: int, finish: str | None, scored: TokenLogprob | None) -> Piece:
        self.tokens += 1
        ended_turn = finish == "stop"  # the engine's "stop" is an end-of-turn token, which is no text
        text = "" if ended_turn else self.matcher.push(self.decoder.push(token))
        if finish and not self.matcher.stopped:
            text += self.matcher.push(self.decoder.flush())
            text += "" if self.matcher.stopped else self.matcher.flush()
        if self.matcher.stopped:
            self.request.cancel()  # its row leaves the batch before the next step
            finish = "stop"
        logprobs = None
        if self.request.logprobs is not None:  # entries for the reply's tokens; the end of turn is no content
            logprobs = [] if ended_turn else [logprob_entry(self.token_bytes, token, scored)]
        return Piece(self.index, text, finish, self.tokens, logprobs)


class Completion:
    """The choices of one request, queued on the engine as soon as it is made (engine.QueueFull: no room).
    `logprobs`: None, or how many alternatives each token's logprobs entry lists."""

    def __init__(self, engine, tokenizer, token_bytes: TokenBytes, prompt: list[int], sampling: SamplingParams,
                 seeds: list[int | None], stops: list[str], ignore_eos: bool = False, logprobs: int | None = None):
        loop, self._events = asyncio.get_running_loop(), asyncio.Queue()
        self.choices = [_Choice(index, Request(prompt, sampling, seed, ignore_eos, logprobs, index=index, loop=loop,
                                               events=self._events), tokenizer, stops, token_bytes)
                        for index, seed in enumerate(seeds)]
        engine.submit([choice.request for choice in self.choices])

    async def pieces(self) -> AsyncIterator[Piece]:
        """Every choice's pieces as the engine produces them (choices interleaved), each ending with a finish.
        Leaving early (a client gone) cancels the choices still running."""
        running = set(range(len(self.choices)))
        try:
            while running:
                index, event = await self._events.get()
                if isinstance(event, Exception):
                    raise event
                if index not in running:  # a token drawn before its cancellation reached the engine
                    continue
                piece = self.choices[index].take(*event)
                if piece.finish:
                    running.discard(index)
                yield piece
        finally:
            self.cancel()

    def cancel(self) -> None:
        for choice in self.choices:
            choice.request.cancel()
