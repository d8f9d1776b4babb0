"""The ppo stage: the SFT policy trained against the reward model by our PPO (`ppo.py`, resumable) or trl's GRPO /
RLOO (`trl_rl.py`), compared with the SFT model on held-out prompts (`rl.compare_policies`), and saved."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from chatforge.console import log
from chatforge.errors import ChatforgeError
from chatforge.files import atomic_path
from chatforge.modeling import training_window
from chatforge.prompts import build_prompts, heldout_prompts
from chatforge.runtime import autocast, stage_precision, start_stage
from chatforge.training.checkpoints import Checkpoints, digest, digest_json, open_live
from chatforge.training.lora import merge_adapters
from chatforge.training.ppo import PPOTrainer
from chatforge.training.rl import (STAGE, RLParams, compare_policies, load_policy_and_reference, load_reward_and_critic,
                                   log_comparison, score_normalization)
from chatforge.training.trl_rl import train_with_trl


def train_policy(sft_dir: Path, reward_dir: Path, reward_report: Path, train_conversations: list[dict],
                 heldout_conversations: list[dict], params: RLParams, out_dir: Path, live_dir: Path,
                 checkpoint_dir: Path) -> dict | None:
    """The ppo stage: the SFT policy trained against the reward model in `reward_dir` (our PPO, resuming from a
    checkpoint in `checkpoint_dir` made from the same params and inputs; or trl's GRPO / RLOO), compared with the
    SFT model on held-out prompts and saved (adapters merged) to `out_dir`; returns the report on the main
    process, None on the others."""
    start = time.perf_counter()
    start_stage(params.seed, params.threads)
    accelerator = Accelerator()
    dtype = stage_precision(STAGE, accelerator.device, params.precision)
    cast = autocast(accelerator.device, dtype)

    if not reward_report.exists():
        raise ChatforgeError(f"{reward_report}: not found; run `dvc repro reward` first")
    score_mean, score_std = score_normalization(json.loads(reward_report.read_text()), reward_report)
    tokenizer, policy, reference = load_policy_and_reference(sft_dir, params.lora)
    reward_model, critic = load_reward_and_critic(reward_dir, tokenizer.pad_token_id, params.lora)
    log(STAGE, f"policy and reference from {sft_dir}, reward model and critic from {reward_dir} "
               f"(score normalized with mean {score_mean:.3f}, std {score_std:.3f})")

    context = training_window(policy)
    max_prompt_tokens = min(params.max_prompt_tokens, context - params.max_new_tokens)
    prompt_counts: dict = {}
    prompts = build_prompts(train_conversations, tokenizer, max_prompt_tokens, prompt_counts)
    heldout_counts: dict = {}
    heldout = heldout_prompts(build_prompts(heldout_conversations, tokenizer, max_prompt_tokens, heldout_counts),
                              params.heldout_prompts, params.seed)
    if not prompts or not heldout:
        raise ChatforgeError(f"train / held-out conversations: no prompt fits in {max_prompt_tokens} tokens; "
                             f"raise ppo.max_prompt_tokens or lower ppo.max_new_tokens")
    log(STAGE, f"prompts (≤ {max_prompt_tokens} tokens): train {prompt_counts}, held-out {len(heldout)} "
               f"of {heldout_counts['prompts']}")

    resumed_step, checkpoints = 0, None
    if params.algorithm == "ppo":
        checkpoints = Checkpoints(Path(checkpoint_dir), STAGE, {
            "params": dataclasses.asdict(params),
            "inputs": {"sft": digest(sft_dir), "reward": digest(reward_dir), "reward_report": digest(reward_report),
                       "train": digest_json(train_conversations)},
        })
        # The main process picks the checkpoint (and clears stale ones); the others follow its choice.
        resume_from = broadcast_object_list([checkpoints.resumable() if accelerator.is_main_process else None])[0]
        resumed_step = Checkpoints.state(resume_from)["step"] if resume_from else 0
        # steps are logged from 0: step k's row is the (k+1)-th
        live = open_live(live_dir, resumed_step - 1 if resume_from else None) if accelerator.is_main_process else None
        trainer = PPOTrainer(policy, reference, reward_model, critic, tokenizer, params, score_mean, score_std,
                             accelerator, cast)
        policy = trainer.train(prompts, live, checkpoints, resume_from)
    else:
        log(STAGE, f"{params.algorithm} runs trl's trainer without checkpoints: a killed run starts over")
        live = open_live(live_dir) if accelerator.is_main_process else None
        policy = train_with_trl(policy, reward_model.to(accelerator.device), tokenizer, prompts, params,
                                score_mean, score_std, cast, live)
    if live is not None:
        live.end()
    train_seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None

    device = accelerator.device
    comparison = compare_policies(policy.to(device), reference.to(device), reward_model.to(device), tokenizer,
                                  heldout, params, score_mean, score_std, cast)
    log_comparison(comparison)
    with atomic_path(out_dir, is_dir=True) as tmp:
        merge_adapters(policy).save_pretrained(tmp)  # after the comparison: merging changes the reference too
        tokenizer.save_pretrained(tmp)
    if checkpoints is not None:
        checkpoints.complete(params.steps)
    log(STAGE, f"wrote {out_dir}")
    return {
        "algorithm": params.algorithm,
        **comparison,
        "train_prompts": prompt_counts,
        "resumed_from_step": resumed_step,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
