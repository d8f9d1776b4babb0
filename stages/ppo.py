"""ppo: RLHF of the SFT policy against the reward model → models/ppo/, reports/ppo.json, reports/live/ppo/.

`ppo.algorithm` picks our PPO (policy, frozen SFT reference, frozen reward model, critic initialized from
the reward model) or trl's GRPO / RLOO with the same reward. Runs unchanged under `accelerate launch`.
`ppo.lora` trains LoRA adapters (the reference is then the policy with its adapters disabled) and saves the
merged policy. Resumable: a killed run continues from models/ppo_checkpoint/ when started again with the
same params and inputs.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from chatforge.console import log, run_stage
from chatforge.errors import ChatforgeError
from chatforge.files import atomic_path, read_jsonl
from chatforge.modeling import training_window
from chatforge.params import section
from chatforge.prompts import build_prompts, heldout_prompts
from chatforge.provenance import write_report
from chatforge.training import rl
from chatforge.training.checkpoints import Checkpoints, digest, trim_live
from chatforge.training.lora import merge_adapters
from chatforge.runtime import autocast, autocast_dtype, describe_precision, seed_everything, set_threads

SFT_DIR = Path("models/sft")
REWARD_DIR = Path("models/reward")
REWARD_REPORT = Path("reports/reward.json")
TRAIN_CONVERSATIONS = Path("data/clean/train.jsonl")
HELDOUT_CONVERSATIONS = Path("data/clean/val.jsonl")
OUTPUT_DIR = Path("models/ppo")
REPORT = Path("reports/ppo.json")
LIVE_DIR = "reports/live/ppo"
CHECKPOINTS = Path("models/ppo_checkpoint")


def main() -> None:
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from dvclive import Live

    start = time.perf_counter()
    params = section(rl.RLParams, "ppo")
    set_threads(params.threads)
    seed_everything(params.seed)
    accelerator = Accelerator()
    dtype = autocast_dtype(accelerator.device, params.precision)
    describe_precision(rl.STAGE, accelerator.device, dtype)
    cast = autocast(accelerator.device, dtype)

    if not REWARD_REPORT.exists():
        raise ChatforgeError(f"{REWARD_REPORT}: not found; run `dvc repro reward` first")
    score_mean, score_std = rl.score_normalization(json.loads(REWARD_REPORT.read_text()), REWARD_REPORT)
    tokenizer, policy, reference = rl.load_policy_and_reference(SFT_DIR, params.lora)
    reward_model, critic = rl.load_reward_and_critic(REWARD_DIR, tokenizer.pad_token_id, params.lora)
    log(rl.STAGE, f"policy and reference from {SFT_DIR}, reward model and critic from {REWARD_DIR} "
                  f"(score normalized with mean {score_mean:.3f}, std {score_std:.3f})")

    context = training_window(policy)
    max_prompt_tokens = min(params.max_prompt_tokens, context - params.max_new_tokens)
    prompt_counts: dict = {}
    prompts = build_prompts(read_jsonl(TRAIN_CONVERSATIONS), tokenizer, max_prompt_tokens, prompt_counts)
    heldout_counts: dict = {}
    heldout = heldout_prompts(
        build_prompts(read_jsonl(HELDOUT_CONVERSATIONS), tokenizer, max_prompt_tokens, heldout_counts),
        params.heldout_prompts, params.seed)
    if not prompts or not heldout:
        raise ChatforgeError(f"{TRAIN_CONVERSATIONS} / {HELDOUT_CONVERSATIONS}: no prompt fits in "
                             f"{max_prompt_tokens} tokens; raise ppo.max_prompt_tokens or lower ppo.max_new_tokens")
    log(rl.STAGE, f"prompts (≤ {max_prompt_tokens} tokens): train {prompt_counts}, held-out {len(heldout)} "
                  f"of {heldout_counts['prompts']}")

    resumed_step = 0
    if params.algorithm == "ppo":
        from chatforge.training.ppo import PPOTrainer

        checkpoints = Checkpoints(CHECKPOINTS, rl.STAGE, {
            "params": dataclasses.asdict(params),
            "inputs": {name: digest(path) for name, path in
                       (("sft", SFT_DIR), ("reward", REWARD_DIR), ("reward_report", REWARD_REPORT),
                        ("train", TRAIN_CONVERSATIONS))},
        })
        # The main process picks the checkpoint (and clears stale ones); the others follow its choice.
        resume_from = broadcast_object_list([checkpoints.resumable() if accelerator.is_main_process else None])[0]
        resumed_step = Checkpoints.state(resume_from)["step"] if resume_from else 0
        if resume_from and accelerator.is_main_process:
            trim_live(LIVE_DIR, resumed_step - 1)  # steps are logged from 0: step k's row is the (k+1)-th
        live = (Live(dir=LIVE_DIR, resume=resume_from is not None, dvcyaml=False, save_dvc_exp=False)
                if accelerator.is_main_process else None)
        trainer = PPOTrainer(policy, reference, reward_model, critic, tokenizer, params, score_mean, score_std,
                             accelerator, cast)
        policy = trainer.train(prompts, live, checkpoints, resume_from)
    else:
        log(rl.STAGE, f"{params.algorithm} runs trl's trainer without checkpoints: a killed run starts over")
        live = Live(dir=LIVE_DIR, dvcyaml=False, save_dvc_exp=False) if accelerator.is_main_process else None
        from chatforge.training.trl_rl import train_with_trl

        policy = train_with_trl(policy, reward_model.to(accelerator.device), tokenizer, prompts, params,
                                score_mean, score_std, cast, live)
    if live is not None:
        live.end()
    train_seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return

    device = accelerator.device
    comparison = rl.compare_policies(policy.to(device), reference.to(device), reward_model.to(device), tokenizer,
                                     heldout, params, score_mean, score_std, cast)
    rl.log_comparison(comparison)
    with atomic_path(OUTPUT_DIR, is_dir=True) as tmp:
        merge_adapters(policy).save_pretrained(tmp)  # after the comparison: merging changes the reference too
        tokenizer.save_pretrained(tmp)
    if params.algorithm == "ppo":
        checkpoints.complete(params.steps)
    log(rl.STAGE, f"wrote {OUTPUT_DIR}")
    write_report(REPORT, {
        "algorithm": params.algorithm,
        **comparison,
        "train_prompts": prompt_counts,
        "resumed_from_step": resumed_step,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
    })
    log(rl.STAGE, f"wrote {REPORT}")


main = run_stage(main)

if __name__ == "__main__":
    main()
