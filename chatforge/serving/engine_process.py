"""A model's batching engine in a child process: the server's event loop and the model never share a lock.

In one process the engine's thread and the event loop (HTTP, the chat template, server-sent events) take
turns on the interpreter lock, and a small model's step is almost all Python (a batch of 20 rows costs about
what one row costs), so every millisecond the loop spends is a millisecond of decoding lost. As vLLM's engine
core, the engine runs in its own process: the server sends it requests and cancellations over a pipe, and a
reader thread hands each step's tokens to the event loops (`engine.to_event_loops`). The child is the same
`BatchingEngine`; what crosses the pipe is prompt ids, sampling settings and (request id, token, finish).

    child → server: ("ready", context length) | ("failed", one-line error) once, then per step
                    (events [(id, token, finish, logprob)], failures [(id, message)],
                     (active, queued, cancelled, steps))
    server → child: ("submit", [(id, prompt, sampling, seed, ignore_eos, logprobs)]) | ("cancel", id) | ("close",)
"""
from __future__ import annotations

import multiprocessing
import signal
import threading
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.serving.engine import BatchingEngine, QueueFull, Request, to_event_loops


class EngineGone(RuntimeError):
    """The model's engine process has exited (answered 503)."""


class EngineProcess:
    """`BatchingEngine`'s interface (submit, close, max_batch, active, queued, cancelled, steps) over a child
    process that loads the model from `path`; a model that cannot load is the child's one-line ChatforgeError."""

    def __init__(self, path: Path, name: str, max_batch: int, max_queue: int):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.active = self.queued = self.cancelled = self.steps = 0
        context = multiprocessing.get_context("spawn")  # a forked child would inherit torch's threads and locks
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=_serve_in_child, args=(child_end, str(path), name, max_batch),
                                        name=f"chatforge-engine-{name}", daemon=True)
        self._process.start()
        child_end.close()
        try:
            kind, value = self._conn.recv()
        except EOFError:
            kind, value = "failed", f"{path}: the engine process exited while loading the model"
        if kind == "failed":
            self._process.join(timeout=10)
            raise ChatforgeError(value)
        self.context_length = value
        self._requests: dict[int, Request] = {}  # in flight, by id(request)
        self._lock = threading.Lock()  # the event loop submits and cancels; the reader delivers
        self._closing = False
        self._reader = threading.Thread(target=self._read, name=f"engine-reader-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def submit(self, requests: list[Request]) -> None:
        """Send `requests` to the child (all of them, or none: QueueFull when more than max_batch + max_queue would
        be in flight)."""
        with self._lock:
            if not self._process.is_alive():
                raise EngineGone(f"its engine process has exited (code {self._process.exitcode})")
            if len(self._requests) + len(requests) > self.max_batch + self.max_queue:
                waiting = max(0, len(self._requests) - self.max_batch)
                raise QueueFull(f"{waiting} requests are waiting for this model; retry later")
            for request in requests:
                request.on_cancel = self._cancel
                self._requests[id(request)] = request
            self._send(("submit", [(id(request), request.prompt, request.sampling, request.seed, request.ignore_eos,
                                    request.logprobs) for request in requests]))

    def close(self) -> None:
        self._closing = True
        self._send(("close",))
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
        self._conn.close()

    def _cancel(self, request: Request) -> None:
        with self._lock:
            if self._requests.pop(id(request), None) is not None:
                self._send(("cancel", id(request)))

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError):  # the child is gone: the reader fails what was in flight
            pass

    def _read(self) -> None:
        """Hands the child's events to the event loops until the pipe closes; then whatever was in flight fails."""
        while True:
            try:
                events, failures, (self.active, self.queued, self.cancelled, self.steps) = self._conn.recv()
            except (EOFError, OSError):
                break
            outcomes = [(rid, (token, finish, logprob), finish is not None) for rid, token, finish, logprob in events]
            outcomes += [(rid, RuntimeError(message), True) for rid, message in failures]
            delivered = []
            with self._lock:  # a request's last event takes it out of flight
                for rid, event, last in outcomes:
                    request = self._requests.pop(rid, None) if last else self._requests.get(rid)
                    if request is not None:  # else cancelled here after the child drew its token
                        delivered.append((request, event))
            to_event_loops(delivered)
        self._process.join(timeout=5)  # for its exit code
        with self._lock:
            orphans, self._requests = list(self._requests.values()), {}
        if orphans and not self._closing:
            error = EngineGone(f"the model's engine process exited (code {self._process.exitcode})")
            to_event_loops([(request, error) for request in orphans])


def _serve_in_child(conn, path: str, name: str, max_batch: int) -> None:
    """The child: load the model, then run its BatchingEngine on the requests that come down the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which closes this engine
    from chatforge.inference.loading import load_model
    from chatforge.inference.prompting import context_length, shared_prompt_prefix, stop_ids

    try:
        model, tokenizer = load_model(path)
    except ChatforgeError as error:
        conn.send(("failed", str(error)))
        return
    requests: dict[int, Request] = {}

    def send_step(step_events: list[tuple[Request, object]]) -> None:
        events, failures = [], []
        for request, event in step_events:
            if isinstance(event, Exception):
                failures.append((request.index, f"{type(event).__name__}: {event}"))
                requests.pop(request.index, None)
            else:
                events.append((request.index, *event))
                if event[1] is not None:
                    requests.pop(request.index, None)
        conn.send((events, failures, (engine.active, engine.queued, engine.cancelled, engine.steps)))

    engine = BatchingEngine(model, tokenizer.pad_token_id, stop_ids(tokenizer), tokenizer.all_special_ids, name,
                            max_batch, emit=send_step, prefix=shared_prompt_prefix(tokenizer))
    conn.send(("ready", context_length(model)))
    try:
        while (message := conn.recv())[0] != "close":
            if message[0] == "submit":
                batch = [Request(prompt, sampling, seed, ignore_eos, logprobs, index=rid)
                         for rid, prompt, sampling, seed, ignore_eos, logprobs in message[1]]
                requests.update((request.index, request) for request in batch)
                engine.submit(batch)
            elif (request := requests.pop(message[1], None)) is not None:  # "cancel"
                request.cancelled = True
    except EOFError:  # the server is gone
        pass
    engine.close()
