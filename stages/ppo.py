"""ppo: RLHF of the SFT policy against the reward model → models/ppo/, reports/ppo.json, reports/live/ppo/.

`ppo.algorithm` picks our PPO (policy, frozen SFT reference, frozen reward model, critic initialized from
the reward model) or trl's GRPO / RLOO with the same reward. Runs unchanged under `accelerate launch`.
`ppo.lora` trains LoRA adapters (the reference is then the policy with its adapters disabled) and saves the
merged policy. Resumable: a killed run continues from models/ppo_checkpoint/ when started again with the
same params and inputs.
"""
from __future__ import annotations

from pathlib import Path

from chatforge.console import log, run_stage
from chatforge.files import read_jsonl
from chatforge.params import section
from chatforge.provenance import write_report
from chatforge.training.rl import STAGE, RLParams
from chatforge.training.rlhf import train_policy

SFT_DIR = Path("models/sft")
REWARD_DIR = Path("models/reward")
REWARD_REPORT = Path("reports/reward.json")
TRAIN_CONVERSATIONS = Path("data/clean/train.jsonl")
HELDOUT_CONVERSATIONS = Path("data/clean/val.jsonl")
OUTPUT_DIR = Path("models/ppo")
REPORT = Path("reports/ppo.json")
LIVE_DIR = Path("reports/live/ppo")
CHECKPOINTS = Path("models/ppo_checkpoint")


def main() -> None:
    params = section(RLParams, "ppo")
    train, heldout = read_jsonl(TRAIN_CONVERSATIONS), read_jsonl(HELDOUT_CONVERSATIONS)
    log(STAGE, f"read {len(train)} train and {len(heldout)} held-out conversations")

    report = train_policy(SFT_DIR, REWARD_DIR, REWARD_REPORT, train, heldout, params, OUTPUT_DIR, LIVE_DIR,
                          CHECKPOINTS)
    if report is None:  # not the main process under `accelerate launch`
        return

    write_report(REPORT, report)
    log(STAGE, f"wrote {REPORT}")


main = run_stage(main)

if __name__ == "__main__":
    main()
