"""Reward training speed: length-bucketed batches and bf16 autocast against random batches in fp32.

Trains the same model on the same pairs (`data/preferences/train.jsonl`, from `models/sft`, the `reward`
params) for `--epochs` with each variant, and prints seconds, pairs per second and the speed-up over the
baseline (random batches, fp32) measured in the same run, plus the val accuracy each variant reached.

    python benchmarks/reward_speed.py [--epochs 0.5] [--threads 0]

Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.files import read_jsonl  # noqa: E402
from chatforge.params import section  # noqa: E402
from chatforge.training.reward import RewardParams, train_reward_model  # noqa: E402

VARIANTS = {  # name -> overrides; the first is the baseline
    "random batches, fp32": {"bucket_by_length": False, "precision": "fp32"},
    "bucketed, fp32": {"bucket_by_length": True, "precision": "fp32"},
    "random batches, bf16": {"bucket_by_length": False, "precision": "bf16"},
    "bucketed, bf16": {"bucket_by_length": True, "precision": "bf16"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=Path("data/preferences"))
    parser.add_argument("--model", type=Path, default=Path("models/sft"))
    parser.add_argument("--epochs", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="default: params.yaml reward.threads")
    args = parser.parse_args()
    train, val = read_jsonl(args.pairs / "train.jsonl"), read_jsonl(args.pairs / "val.jsonl")
    base = dataclasses.replace(section(RewardParams, "reward"), epochs=args.epochs, eval_steps=10**9)
    if args.threads is not None:
        base = dataclasses.replace(base, threads=args.threads)
    results = {}
    for name, overrides in VARIANTS.items():
        params = dataclasses.replace(base, **overrides)
        with tempfile.TemporaryDirectory(prefix="reward-speed-") as scratch:
            report = train_reward_model(args.model, train, val, params, Path(scratch) / "m", Path(scratch) / "live")
        results[name] = report
        print(f"{name:<22} {report['train_seconds']:7.1f}s  {len(train) * args.epochs / report['train_seconds']:6.1f} "
              f"pairs/s  val accuracy {report['accuracy']:.3f}", flush=True)
    baseline = results[next(iter(VARIANTS))]["train_seconds"]
    print(f"\n{len(train)} pairs x {args.epochs} epochs, {results[name]['parameters']:,} parameters, threads "
          f"{base.threads or 'default'}; speed-up over '{next(iter(VARIANTS))}' (same run):")
    for name, report in results.items():
        print(f"  {name:<22} {baseline / report['train_seconds']:.2f}x")


if __name__ == "__main__":
    main()
