"""Direct Preference Optimization (Rafailov et al. 2023) with trl's DPOTrainer: the SFT model trained on the
preference pairs, against itself as the frozen reference; no reward model, no sampling while training.

Pairs are fitted before trl sees them: a prompt longer than `max_prompt_tokens` loses its oldest exchanges
(`prompting.fit_history`, as the chat does), and one whose last user turn alone does not fit is skipped and
counted. trl renders prompt and replies with the model's chat template, and cuts a reply that runs past
`max_length` (counted as `replies_cut`): the prompt is never cut, so the model is trained on the context it
answers in. `dpo.lora` trains LoRA adapters (the reference is the same model with them disabled) and saves the
merged model. The stage checkpoints every `checkpoint_every` steps and resumes a killed run, as sft and reward do
(`trainer_checkpoints.TrainerCheckpoints`, docs/finetuning.md).

The report (reports/dpo.json) measures the saved model as later stages load it:
- the implicit reward r = β·log π/π_ref of chosen and rejected on the val pairs: its accuracy (chosen above
  rejected) overall, per origin and per strategy, laid out as reports/reward.json gives the reward model's;
- replies to held-out prompts sampled at temperature 1 (as reports/ppo.json measures PPO): KL to the SFT
  model in nats per reply (the k1 estimate, log π − log π_ref summed over the reply), reply lengths and
  end-of-turn rates of DPO and SFT.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PrinterCallback

from chatforge.console import log, progress
from chatforge.errors import ChatforgeError
from chatforge.inference.prompting import context_length, fit_history
from chatforge.logprobs import target_logprobs
from chatforge.modeling import training_window
from chatforge.params import require
from chatforge.prompts import build_prompts, heldout_prompts
from chatforge.stats import pair_accuracy
from chatforge.tokenization import load_tokenizer
from chatforge.training import rl
from chatforge.training.checkpoints import digest, digest_json, open_live
from chatforge.training.trainer_checkpoints import TrainerCheckpoints
from chatforge.training.live import LiveCallback
from chatforge.training.lora import add_adapters, describe_trainable, merge_adapters
from chatforge.training.trainer_params import TrainerParams
from chatforge.runtime import autocast, bound_fused_head_tiles, default_device, stage_precision, start_stage
from chatforge.training.sft import save_chat_model

STAGE = "dpo"


@dataclass
class DPOParams(TrainerParams):
    """params.yaml section `dpo`: the shared trainer knobs (trainer_params.py; `batch_size` is pairs) and these."""

    beta: float = 0.1                    # strength of the pull towards the reference: higher stays closer to SFT
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # DPO's loss; IPO (Azar et al.); SLiC's hinge
    warmup_steps: float = 0.1            # < 1: a share of the steps; >= 1: a number of steps
    max_length: int | None = None        # tokens of prompt + reply; null = the model's context
    max_prompt_tokens: int = 96          # longer prompts lose their oldest exchanges
    max_val_pairs: int | None = None     # val metrics on a fixed sample of this many pairs; null = all
    heldout_prompts: int = 64            # held-out prompts (val split) whose samples measure KL and length
    max_new_tokens: int = 32             # per held-out reply

    RENAMED = {"warmup_ratio": "warmup_steps", "grad_accumulation": "gradient_accumulation_steps"}

    def validate(self, section: str) -> None:
        super().validate(section)
        require(self.beta > 0, f"{section}.beta", "must be > 0")
        for key in ("max_prompt_tokens", "heldout_prompts", "max_new_tokens"):
            require(getattr(self, key) >= 1, f"{section}.{key}", "must be >= 1")
        require(self.max_length is None or self.max_length > self.max_prompt_tokens, f"{section}.max_length",
                f"must exceed max_prompt_tokens ({self.max_prompt_tokens}), or be null (the model's context)")
        require(self.max_val_pairs is None or self.max_val_pairs >= 1, f"{section}.max_val_pairs",
                "must be >= 1 or null (all)")


# ---------------------------------------------------------------- data

def fit_pairs(pairs: list[dict], tokenizer, max_prompt_tokens: int) -> tuple[list[dict], list[dict], dict]:
    """(trl rows {prompt, chosen, rejected}, the pairs they came from, counts): each prompt fitted to
    `max_prompt_tokens` by dropping its oldest exchanges; a pair whose last user turn alone is too long is
    skipped."""
    rows, kept, counts = [], [], {"pairs": len(pairs), "prompts_shortened": 0, "skipped_prompt_too_long": 0}
    for pair in pairs:
        try:
            prompt, dropped = fit_history(tokenizer, pair["prompt"], max_prompt_tokens)
        except ChatforgeError:
            counts["skipped_prompt_too_long"] += 1
            continue
        counts["prompts_shortened"] += int(dropped > 0)
        rows.append({"prompt": prompt, "chosen": pair["chosen"], "rejected": pair["rejected"]})
        kept.append(pair)
    return rows, kept, counts


def replies_cut(tokenized, max_length: int) -> int:
    """Sides of the tokenized pairs whose prompt + reply run past `max_length` (trl keeps their start)."""
    return sum(len(row["prompt_ids"]) + len(row[side]) > max_length
               for row in tokenized for side in ("chosen_ids", "rejected_ids"))


# ---------------------------------------------------------------- implicit rewards

def completion_logps(model, batch: dict) -> torch.Tensor:
    """Per sequence, the summed log-probability (fp32) of its completion tokens (right-padded batch); logits are
    computed at the positions that predict a completion token only."""
    ids = batch["input_ids"]
    scored = F.pad(batch["completion_mask"][:, 1:].bool(), (0, 1))  # position i predicts the token at i + 1
    logps = target_logprobs(model, ids, batch["attention_mask"], scored, ids.roll(-1, dims=1))
    return torch.zeros(len(ids), device=logps.device).index_add_(0, scored.nonzero()[:, 0], logps)


@torch.no_grad()
def implicit_rewards(policy, reference, tokenized: list[dict], pad_id: int, max_length: int, beta: float,
                     batch_size: int, cast) -> tuple[list[float], list[float]]:
    """(chosen, rejected) implicit rewards β·(log π − log π_ref) of trl-tokenized pairs, batched as trl batches them."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=pad_id, max_length=max_length)
    device = next(policy.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(tokenized), batch_size):
        batch = {key: value.to(device) for key, value in collate(tokenized[start:start + batch_size]).items()}
        with cast:
            rewards = beta * (completion_logps(policy, batch) - completion_logps(reference, batch))
        good, bad = rewards.chunk(2)
        chosen += good.tolist()
        rejected += bad.tolist()
    return chosen, rejected


def reward_report(pairs: list[dict], chosen: list[float], rejected: list[float]) -> dict:
    margins = [good - bad for good, bad in zip(chosen, rejected)]
    return {
        **pair_accuracy(pairs, [margin > 0 for margin in margins]),
        "mean_margin": round(statistics.fmean(margins), 4),
        "chosen_reward_mean": round(statistics.fmean(chosen), 4),
        "rejected_reward_mean": round(statistics.fmean(rejected), 4),
    }


# ---------------------------------------------------------------- held-out replies

def drift_from_sft(policy, sft, tokenizer, prompts: list[dict], params: DPOParams, cast) -> dict:
    """DPO and SFT replies to the same held-out prompts (`rl.sample_heldout`, temperature 1, same seeds): KL of
    DPO's replies to SFT, lengths, end-of-turn rates, and the first three prompts' replies as examples."""
    replies = rl.sample_heldout(policy, sft, tokenizer, prompts, ("dpo", "sft"), 1.0, params.max_new_tokens,
                                params.eval_batch_size, params.seed + 1_000_003, cast, examples=3)
    return {
        "heldout_prompts": len(prompts),
        "kl_to_sft": statistics.fmean(replies.kl.tolist()),
        "dpo_reply_tokens": statistics.fmean(replies.tokens["dpo"].tolist()),
        "sft_reply_tokens": statistics.fmean(replies.tokens["sft"].tolist()),
        "dpo_end_of_turn_rate": statistics.fmean(replies.ended["dpo"].tolist()),
        "sft_end_of_turn_rate": statistics.fmean(replies.ended["sft"].tolist()),
        "examples": replies.examples,
    }


# ---------------------------------------------------------------- training

def load_policy(sft_dir: Path):
    """The SFT model, fp32, as the policy to train (and, loaded again, as the frozen reference)."""
    if not (Path(sft_dir) / "config.json").exists():
        raise ChatforgeError(f"{sft_dir}: no config.json; run `dvc repro sft` first")
    return AutoModelForCausalLM.from_pretrained(str(sft_dir), dtype=torch.float32, use_safetensors=True)


def make_trainer(policy, reference, tokenizer, train_rows: list[dict], val_rows: list[dict], params: DPOParams,
                 max_length: int, cast, scratch_dir: str | None, callbacks: list,
                 checkpointing: TrainerCheckpoints | None = None):
    """trl's DPOTrainer; it tokenizes the rows with the chat template. It saves nothing into `scratch_dir` unless
    `checkpointing` (which then names the folder) is given."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # No mixed precision in the Trainer: the config compared `cast` (an autocast context, not a dtype) with
    # torch.bfloat16, which never held, so DPO has always trained in fp32; kept as it was (runs stay identical).
    saving = checkpointing.trainer_args() if checkpointing else {"output_dir": scratch_dir, "save_strategy": "no"}
    config = params.training_args(
        DPOConfig, None,
        **saving,
        beta=params.beta,
        loss_type=[params.loss_type],
        max_length=max_length,
    )
    bound_fused_head_tiles(next(policy.parameters()).device)
    callbacks = [*callbacks, *([checkpointing] if checkpointing else [])]
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(val_rows), processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the rich bar and dvclive show the logs
    return trainer


def train_dpo(sft_dir: Path, train_pairs: list[dict], val_pairs: list[dict], heldout_conversations: list[dict],
              params: DPOParams, out_dir: Path, live_dir: Path, checkpoint_dir: Path | None = None) -> dict:
    """Train from (and against) the SFT model, save the merged model to `out_dir`; returns the report. With
    `checkpoint_dir`, checkpoint there and resume a checkpoint made from the same params and inputs."""
    start = time.perf_counter()
    start_stage(params.seed, params.threads)
    device = default_device()
    dtype = stage_precision(STAGE, device, params.precision)
    cast = autocast(device, dtype)

    tokenizer = load_tokenizer(sft_dir, stage_hint="sft")
    policy = load_policy(sft_dir)
    context = context_length(policy)
    max_length = params.max_length or training_window(policy)
    if max_length > context:
        raise ChatforgeError(f"params.yaml: dpo.max_length={max_length} exceeds the model's context ({context}); "
                             "lower it or set it to null")
    if params.max_prompt_tokens >= max_length:
        raise ChatforgeError(f"params.yaml: dpo.max_prompt_tokens={params.max_prompt_tokens} leaves no room for a "
                             f"reply in {max_length} tokens; lower it")
    train_rows, _, train_fit = fit_pairs(train_pairs, tokenizer, params.max_prompt_tokens)
    val_rows, val_kept, val_fit = fit_pairs(val_pairs, tokenizer, params.max_prompt_tokens)
    if not train_rows or not val_rows:
        raise ChatforgeError(f"no preference pairs fit (train {len(train_rows)} of {len(train_pairs)}, val "
                             f"{len(val_rows)} of {len(val_pairs)}); check reports/preferences.json, or raise "
                             "dpo.max_prompt_tokens")
    heldout_counts: dict = {}
    heldout = heldout_prompts(build_prompts(heldout_conversations, tokenizer, min(
        params.max_prompt_tokens, context - params.max_new_tokens), heldout_counts), params.heldout_prompts, params.seed)
    if not heldout:
        raise ChatforgeError("no held-out prompt fits; lower dpo.max_new_tokens or raise dpo.max_prompt_tokens")

    if params.lora:
        policy = add_adapters(policy, params.lora, f"{STAGE}.lora", task="CAUSAL_LM")
        log(STAGE, f"LoRA r={params.lora.r} on {params.lora.target_modules}: {describe_trainable(policy)}")
    reference = None if params.lora else rl.freeze(load_policy(sft_dir))  # with LoRA: trl disables the adapters
    inputs = {"sft": digest(sft_dir), "train": digest_json(train_pairs), "val": digest_json(val_pairs)}
    checkpointing = TrainerCheckpoints.open(checkpoint_dir, STAGE, params, inputs) if checkpoint_dir else None
    resumed_step = checkpointing.resumed_step if checkpointing else 0
    live = open_live(live_dir, resumed_step or None)
    with tempfile.TemporaryDirectory() as scratch, progress() as bar:
        task = bar.add_task(STAGE, total=None, completed=resumed_step, info="")
        trainer = make_trainer(policy, reference, tokenizer, train_rows, val_rows, params, max_length, cast,
                               None if checkpointing else scratch, [LiveCallback(live, bar, task)], checkpointing)
        steps = trainer.args.max_steps if trainer.args.max_steps > 0 else math.ceil(
            len(trainer.train_dataset) / (params.batch_size * params.gradient_accumulation_steps) * params.epochs)
        bar.update(task, total=steps)
        log(STAGE, f"{len(train_rows)} train / {len(val_rows)} val pairs, {steps} steps of "
                   f"{params.batch_size * params.gradient_accumulation_steps} pairs, beta {params.beta}, "
                   f"{params.loss_type} loss")
        train_start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=checkpointing.resume_from_checkpoint if checkpointing else None)
        train_seconds = time.perf_counter() - train_start
    live.end()
    val_tokenized = list(trainer.eval_dataset)
    if len(val_tokenized) != len(val_kept):  # trl drops pairs whose prompt fills max_length: fitting prevents it
        raise ChatforgeError(f"trl kept {len(val_tokenized)} of {len(val_kept)} val pairs; lower dpo.max_prompt_tokens")
    cut = {"train": replies_cut(trainer.train_dataset, max_length), "val": replies_cut(val_tokenized, max_length)}
    save_chat_model(merge_adapters(trainer.model), tokenizer, out_dir)
    steps = trainer.state.global_step
    if checkpointing:
        checkpointing.checkpoints.complete(steps)
    log(STAGE, f"wrote {out_dir}")
    del trainer, policy, reference  # the trained copies go before two fresh ones load (docs/memory.md)
    gc.collect()

    # Measure the saved artifact as evaluate and chat load it, against a fresh copy of the SFT model.
    policy, sft = rl.freeze(load_policy(out_dir)).to(device), rl.freeze(load_policy(sft_dir)).to(device)
    rewards = implicit_rewards(policy, sft, val_tokenized, tokenizer.pad_token_id, max_length, params.beta,
                               params.eval_batch_size, cast)
    drift = drift_from_sft(policy, sft, tokenizer, heldout, params, cast)
    return {
        **reward_report(val_kept, *rewards),
        **drift,
        "train_pairs": train_fit,
        "val_pairs": val_fit,
        "replies_cut": cut,
        "steps": steps,
        "train_loss": result.training_loss,
        "resumed_from_step": resumed_step,
        "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        "params": dataclasses.asdict(params),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
