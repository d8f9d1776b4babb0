"""DVC stage `dpo`: preference pairs + the SFT model (policy and frozen reference) → models/dpo/, reports/dpo.json,
reports/live/dpo/. trl's DPOTrainer: no reward model.

Resumable: a killed run continues from models/dpo_checkpoint/ when started again with the same params and inputs.
"""
from __future__ import annotations

from pathlib import Path

from chatforge.console import log, run_stage
from chatforge.files import read_jsonl
from chatforge.pairs import read_pairs
from chatforge.params import section
from chatforge.provenance import write_report
from chatforge.training.dpo import DPOParams, train_dpo

PAIRS = Path("data/preferences")
SFT_MODEL = Path("models/sft")
HELDOUT_CONVERSATIONS = Path("data/clean/val.jsonl")
OUT = Path("models/dpo")
LIVE = Path("reports/live/dpo")
REPORT = Path("reports/dpo.json")
CHECKPOINTS = Path("models/dpo_checkpoint")


def main() -> None:
    params = section(DPOParams, "dpo")
    train_pairs, val_pairs = read_pairs(PAIRS, params.max_val_pairs, "dpo")
    report = train_dpo(SFT_MODEL, train_pairs, val_pairs, read_jsonl(HELDOUT_CONVERSATIONS), params, OUT, LIVE,
                       CHECKPOINTS)
    write_report(REPORT, report)
    log("dpo", f"val implicit-reward accuracy {report['accuracy']:.3f} {report['accuracy_by_origin']}; held-out "
               f"replies: KL to SFT {report['kl_to_sft']:.2f} nats, {report['dpo_reply_tokens']:.1f} tokens "
               f"(SFT {report['sft_reply_tokens']:.1f}); wrote {REPORT}")


main = run_stage(main)

if __name__ == "__main__":
    main()
