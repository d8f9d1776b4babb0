"""Pretraining throughput against baselines measured in the same run, on the same model and batch.

    python benchmarks/train_throughput.py [--steps 4] [--rounds 3] [--batch-size 16] [--threads 0] [--skip-trainer]

Measures tokens/s of: our training step (chatforge.training.pretrain.optimizer_step: bf16 where the CPU
has it, as bf16 weights with fp32 masters, the loss from bf16 logits, fused AdamW, accelerate,
runtime.training_attention's kernel); a plain PyTorch loop (fp32 forward, backward, AdamW step); the HF
Trainer with its defaults (fp32); and the machine's bf16 matmul throughput on a large square matmul (the
practical peak: the fastest of several). The loops run in alternating rounds and each reports its median
step time, so that drift on a shared machine hits every loop alike.
Prints the ratios and the model FLOPs utilization: FLOPs per token x tokens/s over that peak, with FLOPs
per token = 6 x parameters + 12 x layers x width x context (PaLM's definition, appendix B: the weight
matmuls forward and backward plus attention's two matmuls; with tied embeddings every parameter is a
matmul weight, the LM head included).
The model is the `model` section of params.yaml with the vocabulary of models/tokenizer (or 2048). All loops
run in one process after runtime.set_threads, so all of them get its allocator setting (keep_freed_memory).

Figures: docs/pretraining.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.modeling import ModelConfig, build_model, count_parameters  # noqa: E402
from chatforge.params import section  # noqa: E402
from chatforge.training.pretrain import (  # noqa: E402
    PretrainConfig, compute_model, make_optimizer, optimizer_step,
)
from chatforge.runtime import autocast_dtype, set_threads, training_attention  # noqa: E402


def tokenizer_for_benchmark():
    from chatforge.tokenization import load_tokenizer, train_tokenizer

    if Path("models/tokenizer/tokenizer.json").exists():
        return load_tokenizer("models/tokenizer")
    words = [f"w{i} x{i % 97} y{i % 89}" for i in range(20000)]
    return train_tokenizer(words, vocab_size=2048, min_frequency=1)


def stepwise(step: Callable[[], None]) -> Callable[[int], list[float]]:
    """A loop runner: `steps` calls of `step`, returning the seconds of each."""
    def run(steps: int) -> list[float]:
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        return seconds
    return run


def interleaved(loops: dict[str, Callable[[int], list[float]]], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each loop, measured in alternating rounds after one warm-up round:
    a shared machine drifts over minutes (docs/pretraining.md), and alternating spreads the drift over every
    loop."""
    for run in loops.values():
        run(2)
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, run in loops.items():
            seconds[name] += run(steps)
    return {name: statistics.median(values) for name, values in seconds.items()}


def matmul_peak(size: int = 4096, repeats: int = 8) -> float:
    """The fastest of `repeats` bf16 matmuls: the highest peak seen, so the MFU is never flattered."""
    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    fastest = min(stepwise(lambda: a @ b)(repeats + 1)[1:])
    return 2 * size**3 / fastest


def trainer_loop(model, inputs: torch.Tensor, learning_rate: float, output_dir: str) -> Callable[[int], list[float]]:
    """The HF Trainer with its defaults; a step's time is the gap between two step ends (its whole loop)."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    rows = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in inputs]
    arguments = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=len(rows), max_steps=1,
                                  report_to="none", save_strategy="no", learning_rate=learning_rate,
                                  disable_tqdm=True, logging_strategy="no")
    clock = StepClock()
    trainer = Trainer(model=model, args=arguments, train_dataset=Dataset.from_list(rows), callbacks=[clock])

    def run(steps: int) -> list[float]:
        clock.ends = []
        trainer.args.max_steps = steps + 1
        trainer.train()
        return [after - before for before, after in zip(clock.ends, clock.ends[1:])]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per loop in each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: pretrain.batch_size")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--skip-trainer", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)

    from accelerate import Accelerator

    model_config = section(ModelConfig, "model")
    train_config = section(PretrainConfig, "pretrain")
    batch_size = args.batch_size or train_config.batch_size
    tokenizer = tokenizer_for_benchmark()
    length = model_config.context_length
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(4, len(tokenizer), (batch_size, length), generator=generator)
    tokens_per_step = batch_size * length
    loops = {}

    # Ours: the step the pretrain loop runs.
    accelerator = Accelerator()
    ours_model = build_model(model_config, tokenizer, seed=0)
    ours_model.set_attn_implementation(training_attention(accelerator.device, train_config.attention))
    parameters = count_parameters(ours_model)
    ours_optimizer = make_optimizer(ours_model, train_config)
    dtype = autocast_dtype(accelerator.device, train_config.precision)
    compute, master, compute_dtype = compute_model(ours_model, train_config, accelerator.device, dtype)
    compute, ours_optimizer = accelerator.prepare(compute, ours_optimizer)
    batch = [(inputs, inputs.roll(-1, dims=1))]
    loops["chatforge step"] = stepwise(lambda: optimizer_step(accelerator, compute, ours_optimizer, batch,
                                                              compute_dtype, train_config.max_grad_norm, master))

    # Plain PyTorch: fp32, HF loss, default AdamW.
    plain_model = build_model(model_config, tokenizer, seed=0)
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=train_config.learning_rate)

    def plain_step():
        loss = plain_model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()

    loops["plain PyTorch fp32"] = stepwise(plain_step)

    with tempfile.TemporaryDirectory() as output_dir:
        if not args.skip_trainer:
            loops["HF Trainer defaults (fp32)"] = trainer_loop(build_model(model_config, tokenizer, seed=0), inputs,
                                                               train_config.learning_rate, output_dir)
        seconds = interleaved(loops, args.rounds, args.steps)
    results = {name: tokens_per_step / step_seconds for name, step_seconds in seconds.items()}

    peak = matmul_peak()
    flops_per_token = (6 * parameters + 12 * model_config.resolved_num_layers
                       * model_config.resolved_hidden_size * length)
    ours = results["chatforge step"]
    print(f"model: {parameters / 1e6:.2f}M parameters, batch {batch_size} x {length} tokens, "
          f"{torch.get_num_threads()} threads, "
          + ("bf16 weights, fp32 masters" if master else f"precision {dtype or 'fp32'}"))
    print(f"bf16 matmul peak (4096^3): {peak / 1e9:.1f} GFLOP/s")
    for name, tokens_per_second in results.items():
        mfu = flops_per_token * tokens_per_second / peak
        print(f"{name:28s} {tokens_per_second:9,.0f} tokens/s   ours/this {ours / tokens_per_second:5.2f}x   "
              f"MFU {mfu:6.1%}")


if __name__ == "__main__":
    main()
