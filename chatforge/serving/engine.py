"""Continuous batching: one thread per model steps every active request together (in the model's own process
under `chatforge serve`, `serving/engine_process.py`).

Requests wait in a bounded queue. Between two steps the engine admits as many as `max_batch` leaves room
for; the next step prefills their prompts in the same forward pass that feeds every running row its last
token (`batch.DecodingBatch.step(joining=...)`). A row leaves the moment it ends (a stop token, its
max_tokens) or is cancelled (its client left, or a stop sequence cut it), which frees its place for the next
waiting request. A torch model never runs in two threads at once, and generation never blocks the event loop:
each step's tokens go back to it in one call.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable

from chatforge.console import console
from chatforge.inference.batch import DecodingBatch
from chatforge.inference.sampling import Row


# Arrivals join in the running rows' next step (a packed step, `DecodingBatch.step`), which costs each joining
# prompt its tokens' work but still a fixed share of a step per admission, so the engine gathers arrivals a little:
# it admits them once they are ADMIT_SHARE of the running rows, after MAX_WAIT_STEPS steps, or at once into an
# empty batch (as TGI's waiting_served_ratio and max_waiting_tokens). Measured best of (0, 0), (0.1, 1), (0.2, 1),
# (0.25, 2) and (0.25, 3) on p50 latency under load (docs/serving.md).
ADMIT_SHARE = 0.1
MAX_WAIT_STEPS = 1


class QueueFull(Exception):
    """More requests are waiting for a model than the server accepts (answered 429 with Retry-After)."""

    retry_after_s = 1  # rows leave every step, so a place is usually free within a second


@dataclass(eq=False)
class Request(Row):
    """One choice of one completion request: a row whose tokens go to `events` on the event loop `loop`.

    `events` gets (index, (token, finish, logprob)) per token, finish None | "stop" | "length" and logprob a
    `sampling.TokenLogprob` when the row asked for them (else None), or (index, exception) if generation failed."""

    index: int = 0  # which choice of its completion
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False  # the engine drops the row before its next step
    on_cancel: Callable[[Request], None] | None = None  # an engine in another process is told (engine_process.py)

    def cancel(self) -> None:
        """From the event loop: the client left, or a stop sequence ended the choice."""
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel(self)


def _put_all(events: list[tuple[Request, object]]) -> None:
    for request, event in events:
        request.events.put_nowait((request.index, event))


def to_event_loops(events: list[tuple[Request, object]]) -> None:
    """A step's events in one call per event loop: a wake-up per token costs the loop more than the token."""
    by_loop = defaultdict(list)
    for request, event in events:
        by_loop[request.loop].append((request, event))
    for loop, loop_events in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            loop.call_soon_threadsafe(_put_all, loop_events)


class BatchingEngine:
    """`emit` gets each step's (request, (token, finish) | exception) events, from the engine's thread. The
    queue's cap is its owner's (`EngineProcess.submit`): the engine takes every request it is given."""

    def __init__(self, model, pad_id: int, stop: list[int], unpenalized: list[int], name: str, max_batch: int,
                 emit: Callable[[list[tuple[Request, object]]], None], prefix: list[int] = ()):
        self.batch = DecodingBatch(model, pad_id, stop, unpenalized, prefix=prefix)
        self.emit = emit
        self.max_batch = max_batch
        self.cancelled = 0  # rows dropped before their end: client gone or a stop sequence reached
        self.steps = 0
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._steps_waited = 0  # decode steps since a waiting request could have been admitted
        self._thread = threading.Thread(target=self._run, name=f"model-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self.batch)

    def submit(self, requests: list[Request]) -> None:
        with self._wake:
            self._waiting.extend(requests)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # --------------------------------------------------------------------------------- the engine thread

    def _next_admissions(self) -> list[Request] | None:
        """Waiting requests that fit in the batch now; blocks while there is nothing to do; None: closing."""
        with self._wake:
            while not self._closing and not self._waiting and not len(self.batch):
                self._wake.wait()
            if self._closing:
                return None
            room = self.max_batch - len(self.batch)
            due = (len(self._waiting) >= ADMIT_SHARE * len(self.batch) or self._steps_waited >= MAX_WAIT_STEPS)
            if not (room and self._waiting and due):
                self._steps_waited += bool(room and self._waiting)
                return []
            self._steps_waited = 0
            admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        gone = [request for request in admitted if request.cancelled]
        self.cancelled += len(gone)
        return [request for request in admitted if not request.cancelled]

    def _run(self) -> None:
        while (admitted := self._next_admissions()) is not None:
            try:
                gone = [row for row in self.batch.rows if row.cancelled]
                self.batch.remove(gone)
                self.cancelled += len(gone)
                self.emit(self._tokens(self.batch.step(joining=admitted)))
                self.steps += 1
            except Exception as error:  # every row in flight fails with it; the server goes on
                console.print_exception()
                failed = {id(row): row for row in admitted + self.batch.rows}.values()
                self.emit([(request, error) for request in failed])
                self.batch.remove(self.batch.rows)

    @staticmethod
    def _tokens(advanced: list[Request]) -> list[tuple[Request, tuple]]:
        return [(request, (request.tokens[-1], ("stop" if request.ended else "length") if request.done else None,
                           request.token_logprobs[-1] if request.logprobs is not None else None))
                for request in advanced]
