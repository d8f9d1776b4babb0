"""Generation speed with and without the KV cache, in one run, on a model of the default size.

    python benchmarks/generation_speed.py [--new-tokens 256] [--prompt-tokens 32] [--threads 0]

Greedy decoding of the same prompt through `chatforge.inference.generate.sample_tokens`, forced to produce
`--new-tokens` tokens (the stop token is ignored). Without the cache every step re-runs the whole
sequence, so its cost per token grows with the length. The two run in alternating rounds and each reports
its median, so that drift on a shared machine hits both (docs/benchmarks.md). Also measured: bf16
autocast against fp32 (batch 1 and batch 8), which decides whether generation on CPU should autocast.
The model is the `model` section of params.yaml with the vocabulary of models/tokenizer (or 2048), its
context stretched to fit prompt + new tokens (RoPE has no learned positions; only the length changes).

Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chatforge.inference.generate import sample_tokens  # noqa: E402
from chatforge.inference.sampling import SamplingParams  # noqa: E402
from chatforge.modeling import ModelConfig, build_model, count_parameters  # noqa: E402
from chatforge.params import section  # noqa: E402
from chatforge.runtime import autocast, cpu_has_fast_bf16, set_threads  # noqa: E402
from train_throughput import tokenizer_for_benchmark  # noqa: E402


def decode_seconds(model, prompts, sampling, use_cache: bool, dtype=None) -> tuple[float, torch.Tensor]:
    """Wall seconds for greedy `sampling.max_new_tokens` steps, and the tokens picked."""
    start = time.perf_counter()
    with autocast(torch.device("cpu"), dtype):
        steps = list(sample_tokens(model, prompts, sampling, stop=[], pad_id=0, use_cache=use_cache, ignore_stop=True))
    return time.perf_counter() - start, torch.stack(steps, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch's default (one per core)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of cached and uncached decoding")
    args = parser.parse_args()
    set_threads(args.threads)

    tokenizer = tokenizer_for_benchmark()
    config = section(ModelConfig, "model")
    needed = args.prompt_tokens + args.new_tokens
    config = dataclasses.replace(config, context_length=max(config.context_length, needed))
    model = build_model(config, tokenizer, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, len(tokenizer), (args.prompt_tokens,), generator=generator).tolist()
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=args.new_tokens)
    print(
        f"model: {count_parameters(model) / 1e6:.2f}M parameters ({config.resolved_num_layers} layers, "
        f"width {config.resolved_hidden_size}, vocab {len(tokenizer)}), threads {torch.get_num_threads()}, "
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy"
    )
    decode_seconds(model, [prompt], dataclasses.replace(greedy, max_new_tokens=8), use_cache=True)  # warm-up

    rounds = [(decode_seconds(model, [prompt], greedy, use_cache=True),
               decode_seconds(model, [prompt], greedy, use_cache=False)) for _ in range(args.rounds)]
    cached = statistics.median(with_cache[0] for with_cache, _ in rounds)
    uncached = statistics.median(without[0] for _, without in rounds)
    same = all(torch.equal(with_cache[1], without[1]) for with_cache, without in rounds)
    print(f"with KV cache:    {args.new_tokens / cached:8.1f} tokens/s (median of {args.rounds})")
    print(f"without KV cache: {args.new_tokens / uncached:8.1f} tokens/s (median of {args.rounds})")
    print(f"speed-up: {uncached / cached:.1f}x (target >= 3x); same tokens: {same}")

    if not cpu_has_fast_bf16():
        print("bf16 autocast: skipped (this CPU has no native bf16 matmul)")
        return
    for batch in (1, 8):
        prompts = [prompt] * batch
        fp32, _ = decode_seconds(model, prompts, greedy, use_cache=True)
        bf16, _ = decode_seconds(model, prompts, greedy, use_cache=True, dtype=torch.bfloat16)
        rate = batch * args.new_tokens
        print(f"batch {batch}, cached: fp32 {rate / fp32:8.1f} tokens/s, bf16 autocast {rate / bf16:8.1f} tokens/s "
              f"({fp32 / bf16:.2f}x)")


if __name__ == "__main__":
    main()
