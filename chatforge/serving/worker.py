"""Served models: each loaded once, in its own batching-engine process, with a tokenizer for the event loop.

The engine (`serving/engine_process.py` around `serving/engine.py`) runs the model; the event loop renders
prompts and decodes tokens with the tokenizer, which therefore is never used from two threads at once.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError

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
    def __init__(self, spec: ModelSpec, max_batch: int, max_queue: int):
        from chatforge.serving.engine_process import EngineProcess
        from chatforge.tokenization import TokenBytes, load_tokenizer

        self.name = spec.name
        self.path = spec.path
        self.engine = EngineProcess(spec.path, spec.name, max_batch, max_queue)  # loads the model, or one-line error
        self.tokenizer = load_tokenizer(spec.path, stage_hint="sft")
        self.token_bytes = TokenBytes(self.tokenizer)  # logprobs entries give each token's bytes
        self.context_length = self.engine.context_length

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        from chatforge.inference.prompting import prompt_ids

        return prompt_ids(self.tokenizer, messages)

    def health(self) -> dict:
        engine = self.engine
        return {"context_length": self.context_length, "max_batch": engine.max_batch, "active": engine.active,
                "queued": engine.queued, "cancelled": engine.cancelled}

    def close(self) -> None:
        self.engine.close()


class ModelRegistry:
    """The served models by name; the first one is the default."""

    def __init__(self, workers: list[ModelWorker]):
        self.workers = {worker.name: worker for worker in workers}

    @classmethod
    def load(cls, specs: list[ModelSpec], max_batch: int = 32, max_queue: int = 64) -> "ModelRegistry":
        """Starts every model's engine process at once (each spends seconds importing torch and loading); if one
        fails, the others are closed and its one-line error is raised."""
        with ThreadPoolExecutor(max_workers=len(specs)) as pool:
            starting = [pool.submit(ModelWorker, spec, max_batch, max_queue) for spec in specs]
        failed = [future.exception() for future in starting if future.exception() is not None]
        if failed:
            for future in starting:
                if future.exception() is None:
                    future.result().close()
            raise failed[0]
        return cls([future.result() for future in starting])

    @property
    def default(self) -> ModelWorker:
        return next(iter(self.workers.values()))

    def get(self, name: str | None) -> ModelWorker | None:
        return self.default if name is None else self.workers.get(name)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
