"""DVC stage `reward`: preference pairs + the SFT model → reward model in models/reward/, reports/reward.json.

Resumable: a killed run continues from models/reward_checkpoint/ when started again with the same params and inputs.
"""
from __future__ import annotations

from pathlib import Path

from chatforge.console import log, run_stage
from chatforge.pairs import read_pairs
from chatforge.params import section
from chatforge.provenance import write_report
from chatforge.training.reward import RewardParams, train_reward_model

PAIRS = Path("data/preferences")
SFT_MODEL = Path("models/sft")
OUT = Path("models/reward")
LIVE = Path("reports/live/reward")
REPORT = Path("reports/reward.json")
CHECKPOINTS = Path("models/reward_checkpoint")


def main() -> None:
    params = section(RewardParams, "reward")
    train_pairs, val_pairs = read_pairs(PAIRS, params.max_val_pairs, "reward")
    report = train_reward_model(SFT_MODEL, train_pairs, val_pairs, params, OUT, LIVE, CHECKPOINTS)
    write_report(REPORT, report)
    log("reward", f"val accuracy {report['accuracy']:.3f} {report['accuracy_by_strategy']}, "
                  f"mean margin {report['mean_margin']:.2f}; wrote {OUT}/ and {REPORT}")


main = run_stage(main)

if __name__ == "__main__":
    main()
