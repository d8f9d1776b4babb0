"""SFT step speed with trl's SFTTrainer in bf16 (accelerate's CPU autocast) against fp32, in one run.

    python benchmarks/sft_precision.py [--model models/base] [--data data/clean/train.jsonl] [--steps 20]
                                       [--threads 0] [--rounds 2]

Same model, same fitted windows, same trainer configuration as the sft stage (`make_trainer`); the two
precisions alternate for `--rounds` rounds so that noise from a shared machine hits both. Prints
optimizer steps/s and trained assistant tokens/s for each, and the bf16/fp32 ratio. The model is
`--model` when it exists, else a random one of the `model` params section (same shape as models/base).

Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.conversation import read_conversations  # noqa: E402
from chatforge.files import SkipLog  # noqa: E402
from chatforge.inference.loading import load_model  # noqa: E402
from chatforge.inference.prompting import context_length  # noqa: E402
from chatforge.modeling import ModelConfig, build_model  # noqa: E402
from chatforge.params import section  # noqa: E402
from chatforge.tokenization import load_tokenizer  # noqa: E402
from chatforge.chat_windows import fit_conversations  # noqa: E402
from chatforge.runtime import set_threads  # noqa: E402
from chatforge.training.sft import SFTParams, make_trainer  # noqa: E402


def load_or_build(path: Path):
    if (path / "config.json").exists():
        return load_model(path, stage_hint="pretrain")
    tokenizer = load_tokenizer("models/tokenizer")
    return build_model(section(ModelConfig, "model"), tokenizer, seed=0), tokenizer


def steps_per_second(model, tokenizer, windows, params: SFTParams, dtype) -> float:
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as scratch:
        trainer = make_trainer(model, tokenizer, windows, params, dtype, scratch)
        started = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - started
    model.load_state_dict(initial)  # every run starts from the same weights
    return params.max_steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--data", type=Path, default=Path("data/clean/train.jsonl"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    set_threads(args.threads)
    model, tokenizer = load_or_build(args.model)
    params = dataclasses.replace(section(SFTParams, "sft"), max_steps=args.steps, logging_steps=10**6)
    windows, stats = fit_conversations(tokenizer, read_conversations(args.data, SkipLog()), context_length(model))
    tokens_per_step = stats.assistant_tokens_trained / stats.windows * params.batch_size * params.gradient_accumulation_steps
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {stats.windows} windows, "
          f"batch {params.batch_size} x {params.gradient_accumulation_steps}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")

    results = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            results[name].append(steps_per_second(model, tokenizer, windows, params, dtype))
    best = {name: max(values) for name, values in results.items()}
    for name, rate in best.items():
        print(f"{name}: {rate:.2f} steps/s, {rate * tokens_per_step:,.0f} assistant tokens/s "
              f"(rounds: {', '.join(f'{v:.2f}' for v in results[name])})")
    print(f"bf16 / fp32 = {best['bf16'] / best['fp32']:.2f}x")


if __name__ == "__main__":
    main()
