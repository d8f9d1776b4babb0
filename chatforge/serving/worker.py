"""Served models: one worker thread per model, fed through a bounded queue.

A torch model is not safe to run from two threads at once, and generation must not block the event
loop. Each model therefore gets a single-thread executor: requests queue there and run one at a time,
off the event loop. Streamed text crosses back to the loop through an asyncio queue; closing the
stream (client gone) sets a flag that the worker checks between tokens, so generation stops.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from chatforge.errors import ChatforgeError


class QueueFull(Exception):
    """More requests are waiting for a model than the server accepts."""


DEFAULT_MODELS = ("sft", "ppo", "base")  # served when no --model is given, those that exist; sft is the default
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ModelSpec:
    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """`NAME=DIR` or `DIR` (named after the directory)."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = Path(text).name, text
        if not MODEL_NAME.match(name):
            raise ChatforgeError(f"--model {text}: the name {name!r} must be letters, digits, '_', '.', '-'")
        return cls(name, Path(path))


def model_specs(arguments: list[str] | None, models_dir: Path = Path("models")) -> list[ModelSpec]:
    """The models to serve: the `--model` arguments, else those of models/{sft,ppo,base} that exist."""
    specs = [ModelSpec.parse(text) for text in arguments] if arguments else [
        ModelSpec(name, models_dir / name) for name in DEFAULT_MODELS if (models_dir / name).is_dir()
    ]
    names = [spec.name for spec in specs]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise ChatforgeError(f"two models are named {duplicate!r}; name them with --model NAME=DIR")
    if not specs:
        raise ChatforgeError("no model to serve: models/sft, models/ppo and models/base are absent; "
                             "run `dvc repro sft` or pass --model DIR")
    return specs


class ModelWorker:
    def __init__(self, spec: ModelSpec, max_queue: int):
        from chatforge.generation import context_length, load_model
        from chatforge.tokenization import load_tokenizer

        self.name = spec.name
        self.path = spec.path
        self.model, self.tokenizer = load_model(spec.path)
        # The fast tokenizer is not safe to share between threads: the event loop counts prompt
        # tokens with its own copy while the worker thread generates.
        self._counting_tokenizer = load_tokenizer(spec.path, stage_hint=spec.name)
        self.context_length = context_length(self.model)
        self.max_queue = max_queue
        self._pending = 0  # touched only on the event loop
        self.streams_cancelled = 0  # streams closed before their end: client gone or stop sequence (worker thread)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{spec.name}")

    def prompt_tokens(self, messages: list[dict]) -> int:
        from chatforge.generation import prompt_ids

        return len(prompt_ids(self._counting_tokenizer, messages))

    def completion_tokens(self, text: str) -> int:
        """Tokens of a streamed reply, re-encoded: `stream_reply` yields text, not ids (so an estimate)."""
        return len(self._counting_tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def queued(self) -> int:
        return self._pending

    def ensure_room(self) -> None:
        if self._pending >= self.max_queue:
            raise QueueFull(f"model {self.name!r} has {self._pending} requests waiting; retry later")

    @contextlib.contextmanager
    def _slot(self):
        self.ensure_room()
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1

    async def generate(self, messages: list[dict], sampling, seed: int | None):
        """One complete reply (chatforge.generation.Reply), computed on this model's worker thread."""
        from chatforge.generation import generate_reply

        with self._slot():
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, generate_reply, self.model, self.tokenizer, messages, sampling, seed
            )

    async def stream(self, messages: list[dict], sampling, seed: int | None) -> AsyncIterator[str]:
        """Text pieces as the worker thread produces them; closing the iterator stops generation."""
        from chatforge.generation import stream_reply

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        finished = object()

        def hand_over(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(pieces.put_nowait, item)

        def produce() -> None:
            if cancelled.is_set():  # the client left while this request was still queued
                return
            try:
                for piece in stream_reply(self.model, self.tokenizer, messages, sampling, seed):
                    if cancelled.is_set():
                        self.streams_cancelled += 1
                        break
                    hand_over(piece)
            except Exception as error:  # re-raised on the event loop, in the request's context
                hand_over(error)
            finally:
                hand_over(finished)

        with self._slot():
            loop.run_in_executor(self._executor, produce)
            try:
                while (item := await pieces.get()) is not finished:
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                cancelled.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class ModelRegistry:
    """The served models by name; the first one is the default."""

    def __init__(self, workers: list[ModelWorker]):
        self.workers = {worker.name: worker for worker in workers}

    @classmethod
    def load(cls, specs: list[ModelSpec], max_queue: int) -> "ModelRegistry":
        return cls([ModelWorker(spec, max_queue) for spec in specs])

    @property
    def default(self) -> ModelWorker:
        return next(iter(self.workers.values()))

    def get(self, name: str | None) -> ModelWorker | None:
        return self.default if name is None else self.workers.get(name)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
