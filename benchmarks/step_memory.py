"""Peak memory of LoRA training steps, as trl's sft and dpo trainers take them: the model's loss through trl's
fused LM head, LoRA r 16 on every linear layer, AdamW. Each variant runs in a fresh process (a peak is per
process) over the same four batches of 16 sequences (150, 256, 200 and 240 tokens, half of each scored), and prints
its peak RSS beside the baseline's, measured in the same run:

- `baseline`: trl's own tiles (4096 tokens x 32768 vocabulary entries) and all 16 sequences at once;
- `tiles`: the fused head in 256-token tiles on CPU (`runtime.bound_fused_head_tiles`, what sft and dpo do now);
- `tiles+micro4` / `tiles+micro2`: and gradient accumulation over micro-batches of 4 or 2 sequences (the same
  16 sequences per optimizer step);
- `tiles+checkpointing`: and activation checkpointing instead of micro-batches.

    python benchmarks/step_memory.py --model /path/to/a/saved/model [--variants baseline,tiles]

Figures: docs/memory.md, "The training step".
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("baseline", "tiles", "tiles+micro4", "tiles+micro2", "tiles+checkpointing")
LENGTHS = (150, 256, 200, 240)
SEQUENCES = 16


def run_variant(model_dir: str, variant: str) -> dict:
    """The steps of one variant in this process; returns its peak RSS and seconds."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from chatforge.runtime import bound_fused_head_tiles, set_threads

    set_threads(0)  # the stages' allocator policy
    if "tiles" in variant:
        bound_fused_head_tiles(torch.device("cpu"))
    micro = 4 if "micro4" in variant else 2 if "micro2" in variant else SEQUENCES
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    add_fused_lm_head(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if "checkpointing" in variant:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for length in LENGTHS:
        for _ in range(0, SEQUENCES, micro):
            ids = torch.randint(0, vocab, (micro, length))
            labels = ids.clone()
            labels[:, :length // 2] = -100  # the prompt half is not scored
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
            (out.loss * micro / SEQUENCES).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"variant": variant, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved causal LM folder (safetensors)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_variant(args.model, args.one)))
        return
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    results = []
    for variant in variants:
        output = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", variant],
                                capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    baseline = results[0]
    print(f"{len(LENGTHS)} optimizer steps of {SEQUENCES} sequences ({', '.join(map(str, LENGTHS))} tokens), "
          f"baseline: {baseline['variant']}")
    print(f"{'variant':<22}{'peak RSS MB':>13}{'x baseline':>12}{'seconds':>10}{'x baseline':>12}")
    for result in results:
        print(f"{result['variant']:<22}{result['peak_rss_mb']:>13.0f}"
              f"{result['peak_rss_mb'] / baseline['peak_rss_mb']:>12.2f}{result['seconds']:>10.1f}"
              f"{result['seconds'] / baseline['seconds']:>12.2f}")


if __name__ == "__main__":
    main()
