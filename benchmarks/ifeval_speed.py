"""IFEval on one model, as the `ifeval` stage runs it, against lm-eval's own `hf` backend in the same run.

Prints the four IFEval figures (n, 95% interval), the wall time, prompts/s and generated tokens/s of our
decoding (continuous batching over the KV cache), then the same figures for lm-eval's `hf` model on the first
`--baseline-prompts` prompts of the same sample, and the ratio of seconds per prompt.

    python benchmarks/ifeval_speed.py --model models/sft [--prompts 541] [--max-new-tokens 256]
                                      [--batch-size 16] [--baseline-prompts 4] [--source FILE]

Figures: docs/evaluation.md, "Measured".
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.evaluation.ifeval import (  # noqa: E402
    SHARED_FILE, IFEvalConfig, ensure_punkt_tab, evaluate_ifeval, load_prompts, sample_indices, task_config,
)
from chatforge.inference.loading import load_model  # noqa: E402


def figures(summary: dict) -> str:
    return ", ".join(f"{name} {summary[name]['accuracy']:.3f} [{summary[name]['low']:.3f}, {summary[name]['high']:.3f}]"
                     f" n={summary[name]['n']}" for name in ("prompt_level_strict", "instruction_level_strict",
                                                             "prompt_level_loose", "instruction_level_loose"))


def lm_eval_hf_seconds(model_dir: Path, prompts, indices: list[int], max_new_tokens: int, batch_size: int) -> float:
    """Wall seconds of lm-eval's `hf` backend (transformers' generate) on the same prompts, greedy."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    evaluator.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"},
        tasks=[task_config(prompts)], samples={"ifeval": indices}, apply_chat_template=True,
        gen_kwargs={"max_gen_toks": max_new_tokens}, batch_size=batch_size, bootstrap_iters=0,
        task_manager=TaskManager(include_defaults=False))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[1] / SHARED_FILE))
    parser.add_argument("--prompts", type=int, default=None, help="a seeded sample of this many; default all")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline-prompts", type=int, default=4, help="lm-eval hf backend on this many; 0: skip")
    args = parser.parse_args()

    ensure_punkt_tab()
    prompts = load_prompts([args.source])
    config = IFEvalConfig(prompts=args.prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    model, tokenizer = load_model(args.model)
    started = time.perf_counter()
    summary, samples = evaluate_ifeval(model, tokenizer, prompts, config)
    ours = time.perf_counter() - started
    generated = sum(len(tokenizer(s["reply"], add_special_tokens=False)["input_ids"]) for s in samples)
    print(f"chatforge: {figures(summary)}")
    print(f"chatforge: {len(samples)} prompts in {ours:.1f}s ({len(samples) / ours:.2f} prompts/s, "
          f"{generated / ours:.1f} generated tokens/s, mean reply {generated / len(samples):.0f} tokens, "
          f"{summary['prompts_truncated']} prompts cut to fit)")
    if args.baseline_prompts:
        indices = sample_indices(len(prompts.docs), args.prompts, 0)[: args.baseline_prompts]
        theirs = lm_eval_hf_seconds(args.model, prompts, indices, args.max_new_tokens, min(4, args.batch_size))
        ours_per_prompt, theirs_per_prompt = ours / len(samples), theirs / len(indices)
        print(f"lm-eval hf backend: {len(indices)} prompts in {theirs:.1f}s ({theirs_per_prompt:.1f}s a prompt); "
              f"chatforge {ours_per_prompt:.2f}s a prompt: {theirs_per_prompt / ours_per_prompt:.1f}x faster")
    print(dataclasses.asdict(config))


if __name__ == "__main__":
    main()
