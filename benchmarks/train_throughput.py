"""Pretraining throughput against baselines measured in the same run, on the same model and batch.

    python benchmarks/train_throughput.py [--steps 6] [--batch-size 16] [--threads 0] [--skip-trainer]

Measures tokens/s of: our training step (chatforge.training.pretrain.optimizer_step: bf16 autocast where
the CPU has it, fused AdamW, accelerate, the training attention kernel of runtime.training_attention); a plain PyTorch loop (fp32 forward, backward, AdamW step); the
HF Trainer with its defaults (fp32); and the machine's bf16 matmul throughput on a large square matmul
(the practical peak). Prints the ratios and the model FLOPs utilization: model FLOPs per token x tokens/s over that peak, with
FLOPs per token = 6 x parameters + 12 x layers x width x context (PaLM's definition, appendix B: the
weight matmuls forward and backward, plus attention's score and value matmuls; with tied embeddings
every parameter is a matmul weight, the LM head included).
The model is the `model` section of params.yaml with the vocabulary of models/tokenizer (or 2048).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.modeling import ModelConfig, build_model, count_parameters  # noqa: E402
from chatforge.params import section  # noqa: E402
from chatforge.training.pretrain import PretrainConfig, make_optimizer, optimizer_step  # noqa: E402
from chatforge.training.runtime import autocast_dtype, set_threads, training_attention  # noqa: E402


def tokenizer_for_benchmark():
    from chatforge.tokenization import load_tokenizer, train_tokenizer

    if Path("models/tokenizer/tokenizer.json").exists():
        return load_tokenizer("models/tokenizer")
    words = [f"w{i} x{i % 97} y{i % 89}" for i in range(20000)]
    return train_tokenizer(words, vocab_size=2048, min_frequency=1)


def timed(step, steps: int, warmup: int = 2) -> float:
    """Median seconds per call of `step`, after `warmup` calls: a shared 2-core VM has noisy spikes."""
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2]


def matmul_peak(size: int = 4096, repeats: int = 8) -> float:
    """The fastest of `repeats` bf16 matmuls: the highest peak seen, so the MFU is never flattered."""
    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    a @ b
    fastest = min(timed(lambda: a @ b, 1, warmup=0) for _ in range(repeats))
    return 2 * size**3 / fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
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
    results = {}

    # Ours: the step the pretrain loop runs.
    accelerator = Accelerator()
    model = build_model(model_config, tokenizer, seed=0)
    model.set_attn_implementation(training_attention(accelerator.device, train_config.attention))
    parameters = count_parameters(model)
    optimizer = make_optimizer(model, train_config)
    model, optimizer = accelerator.prepare(model, optimizer)
    dtype = autocast_dtype(accelerator.device, train_config.precision)
    batch = [(inputs, inputs.roll(-1, dims=1))]
    results["chatforge step"] = tokens_per_step / timed(
        lambda: optimizer_step(accelerator, model, optimizer, batch, dtype, train_config.grad_clip), args.steps)

    # Plain PyTorch: fp32, HF loss, default AdamW.
    model = build_model(model_config, tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.learning_rate)

    def plain_step():
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    results["plain PyTorch fp32"] = tokens_per_step / timed(plain_step, args.steps)

    if not args.skip_trainer:
        from datasets import Dataset
        from transformers import Trainer, TrainingArguments

        model = build_model(model_config, tokenizer, seed=0)
        rows = [{"input_ids": inputs[i % batch_size].tolist(), "labels": inputs[i % batch_size].tolist()}
                for i in range(batch_size * (args.steps + 2))]
        with tempfile.TemporaryDirectory() as out:
            training_args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size,
                                              max_steps=2, report_to="none", save_strategy="no",
                                              learning_rate=train_config.learning_rate, disable_tqdm=True)
            trainer = Trainer(model=model, args=training_args, train_dataset=Dataset.from_list(rows))
            trainer.train()  # warm-up, same as the others
            trainer.args.max_steps = args.steps
            start = time.perf_counter()
            trainer.train()
            results["HF Trainer defaults (fp32)"] = tokens_per_step * args.steps / (time.perf_counter() - start)

    peak = matmul_peak()
    flops_per_token = (6 * parameters + 12 * model_config.resolved_num_layers
                       * model_config.resolved_hidden_size * length)
    ours = results["chatforge step"]
    print(f"model: {parameters / 1e6:.2f}M parameters, batch {batch_size} x {length} tokens, "
          f"{torch.get_num_threads()} threads, precision {dtype or 'fp32'}")
    print(f"bf16 matmul peak (4096^3): {peak / 1e9:.1f} GFLOP/s")
    for name, tokens_per_second in results.items():
        mfu = flops_per_token * tokens_per_second / peak
        print(f"{name:28s} {tokens_per_second:9,.0f} tokens/s   ours/this {ours / tokens_per_second:5.2f}x   "
              f"MFU {mfu:6.1%}")


if __name__ == "__main__":
    main()
