"""DVC stage `sft`: models/base + data/clean/{train,val}.jsonl → models/sft/, reports/sft.json, reports/live/sft/.

Resumable: a killed run continues from models/sft_checkpoint/ when started again with the same params and inputs.
"""
from __future__ import annotations

from pathlib import Path

from chatforge.console import log, run_stage
from chatforge.conversation import read_conversations
from chatforge.corpus import fixed_sample
from chatforge.files import SkipLog
from chatforge.params import section
from chatforge.provenance import write_report
from chatforge.training.sft import SFTParams, train_sft

BASE = Path("models/base")
TRAIN = Path("data/clean/train.jsonl")
VAL = Path("data/clean/val.jsonl")
OUT = Path("models/sft")
REPORT = Path("reports/sft.json")
LIVE = Path("reports/live/sft")
CHECKPOINTS = Path("models/sft_checkpoint")


def main() -> None:
    params = section(SFTParams, "sft")
    unreadable = SkipLog()
    train = read_conversations(TRAIN, unreadable)
    all_val = read_conversations(VAL, unreadable)
    val = fixed_sample(all_val, params.max_val_conversations)
    log("sft", f"read {len(train)} train and {len(all_val)} val conversations ({unreadable.total} unreadable lines "
               f"skipped); validating on {len(val)} of them")

    report = train_sft(BASE, train, val, params, OUT, LIVE, CHECKPOINTS)

    write_report(REPORT, {**report, "unreadable": unreadable.as_dict()})
    before, after = report["val_before"], report["val_after"]
    log("sft", f"val assistant loss {before['loss']:.3f} → {after['loss']:.3f}; wrote {REPORT}")


main = run_stage(main)

if __name__ == "__main__":
    main()
