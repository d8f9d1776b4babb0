"""Supervised fine-tuning on chat conversations with trl's SFTTrainer, loss on assistant tokens only.

Conversations are fitted into the context by `chat_windows` (chat template + `{% generation %}` mask) before
trl sees them: the dataset handed over is already tokenized with `labels` (-100 outside the trained
assistant tokens), so trl neither re-tokenizes, nor rebuilds labels, nor truncates (`max_length=None`).
`sft.lora` trains LoRA adapters instead of all weights and saves the merged model; the stage checkpoints
every `checkpoint_every` steps and resumes a killed run (docs/finetuning.md).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import PrinterCallback, TrainerCallback

from chatforge.console import log, progress
from chatforge.errors import ChatforgeError
from chatforge.lm_loss import AssistantLoss, assistant_loss
from chatforge.files import atomic_path
from chatforge.inference.loading import load_model
from chatforge.inference.prompting import context_length, stop_ids
from chatforge.modeling import training_window
from chatforge.modeling import generation_config
from chatforge.params import require
from chatforge.training.lora import add_adapters, describe_trainable, merge_adapters
from chatforge.training.trainer_params import TrainerParams
from chatforge.training.checkpoints import digest, digest_json, open_live
from chatforge.training.trainer_checkpoints import TrainerCheckpoints
from chatforge.chat_windows import FitStats, fit_conversations
from chatforge.runtime import bound_fused_head_tiles, default_device, stage_precision, start_stage

STAGE = "sft"


@dataclass
class SFTParams(TrainerParams):
    """params.yaml section `sft`: the shared trainer knobs (trainer_params.py) and these."""

    learning_rate: float = 1e-3
    max_length: int | None = None       # tokens per window; null = the model's context
    max_val_conversations: int | None = None  # val loss on a fixed sample of this many conversations; null = all

    RENAMED = {"warmup_ratio": "warmup_steps", "grad_accumulation": "gradient_accumulation_steps"}
    TRAINER_EVALUATES = False  # TrainingMonitor validates with assistant_loss

    def validate(self, section: str = STAGE) -> None:
        super().validate(section)
        require(self.max_length is None or self.max_length >= 8, f"{section}.max_length", "must be >= 8 or null")
        require(self.max_val_conversations is None or self.max_val_conversations >= 1,
                f"{section}.max_val_conversations", "must be >= 1 or null (all)")


class TrainingMonitor(TrainerCallback):
    """Main process only: a rich progress bar, and train loss / val assistant loss to dvclive by optimizer step.

    The val loss is `assistant_loss` (token-weighted, the same code as the before/after numbers); the
    Trainer's own eval loss averages per-batch means, which misweights batches of short windows. Own
    dvclive logging because transformers' DVCLive callback logs every TrainingArguments field and counts
    log events, not optimizer steps, as `step`.
    """

    def __init__(self, live_dir: str | Path, validate: Callable[[torch.nn.Module], AssistantLoss], eval_steps: int,
                 initial_val_loss: float):
        self.live_dir, self.validate, self.eval_steps = str(live_dir), validate, eval_steps
        self.initial_val_loss = initial_val_loss
        self.live, self.bar, self.task, self.info = None, None, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        resumed = state.global_step > 0  # the Trainer has loaded a checkpoint: continue its curves
        self.live = open_live(self.live_dir, state.global_step if resumed else None)
        self.bar = progress()
        self.bar.start()
        self.task = self.bar.add_task(STAGE, total=state.max_steps, completed=state.global_step, info="")
        if not resumed:
            self._log(0, "val/loss", self.initial_val_loss)

    def _log(self, step: int, name: str, value: float) -> None:
        self.live.step = step
        self.live.log_metric(name, value)
        self.info[name] = f"{name} {value:.3f}"
        self.bar.update(self.task, info="  ".join(self.info.values()))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is not None and logs and "loss" in logs:
            self._log(state.global_step, "train/loss", float(logs["loss"]))
            self.live.log_metric("train/learning_rate", float(logs.get("learning_rate", 0.0)))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.live is None:
            return
        self.bar.update(self.task, completed=state.global_step)
        if state.global_step % self.eval_steps == 0 or state.global_step == state.max_steps:
            self._log(state.global_step, "val/loss", self.validate(model).loss)

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.make_summary()
            self.live.end()
            self.bar.stop()
            self.live = self.bar = None


def _log_fit(split: str, stats: FitStats) -> None:
    log(STAGE, f"{split}: {stats.conversations} conversations → {stats.windows} windows, "
               f"{stats.assistant_tokens_trained} assistant tokens kept, {stats.assistant_tokens_cut} cut, "
               f"{stats.skipped['total']} skipped {stats.skipped['by_reason'] or ''}")


def _log_loss(when: str, result: AssistantLoss) -> None:
    log(STAGE, f"val assistant loss {when}: {result.loss:.4f} (ppl {result.perplexity:.2f}, "
               f"{result.bits_per_byte:.3f} bits/byte, {result.tokens} tokens)")


def train_sft(base_dir: str | Path, train_records: list[dict], val_records: list[dict], params: SFTParams,
              output_dir: str | Path, live_dir: str | Path, checkpoint_dir: str | Path) -> dict:
    """Fine-tune the model in `base_dir` (resuming from a checkpoint in `checkpoint_dir` made from the same
    params and inputs), save it to `output_dir`; returns the report (see reports/sft.json)."""
    started = time.perf_counter()
    start_stage(params.seed, params.threads)
    model, tokenizer = load_model(base_dir, stage_hint="pretrain")
    context = context_length(model)
    max_length = params.max_length or training_window(model)
    if max_length > context:
        raise ChatforgeError(f"params.yaml: sft.max_length={max_length} exceeds the model's context ({context}); "
                             f"lower it or set it to null")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stop_ids(tokenizer):
        raise ChatforgeError(f"{base_dir}: the tokenizer needs a pad token distinct from <|end|>/<|eos|>; "
                             f"rebuild it with `dvc repro tokenizer`")

    train_windows, train_fit = fit_conversations(tokenizer, train_records, max_length, desc="fitting train")
    val_windows, val_fit = fit_conversations(tokenizer, val_records, max_length, desc="fitting val")
    _log_fit("train", train_fit)
    _log_fit("val", val_fit)
    if not train_windows or not val_windows:
        raise ChatforgeError("sft: no train or no val conversation with an assistant turn; check data/clean/")

    device = default_device()
    dtype = stage_precision(STAGE, device, params.precision)
    model.to(device)

    def validate(model) -> AssistantLoss:
        return assistant_loss(model, tokenizer, val_windows, params.eval_batch_size)

    before = validate(model)
    _log_loss("before", before)
    if params.lora:
        model = add_adapters(model, params.lora, f"{STAGE}.lora", task="CAUSAL_LM")
        log(STAGE, f"LoRA r={params.lora.r} on {params.lora.target_modules}: {describe_trainable(model)}")

    checkpointing = TrainerCheckpoints.open(checkpoint_dir, STAGE, params, {
        "base": digest(base_dir), "train": digest_json(train_records), "val": digest_json(val_records)})
    trainer = make_trainer(model, tokenizer, train_windows, params, dtype, None,
                           TrainingMonitor(live_dir, validate, params.eval_steps, before.loss), checkpointing)
    result = trainer.train(resume_from_checkpoint=checkpointing.resume_from_checkpoint)

    model = merge_adapters(trainer.model)
    after = validate(model)
    _log_loss("after", after)
    if trainer.is_world_process_zero():
        save_chat_model(model, tokenizer, output_dir)
        checkpointing.checkpoints.complete(trainer.state.global_step)
        log(STAGE, f"wrote {output_dir}")
    return {
        "base_model": str(base_dir),
        "max_length": max_length,
        "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        "val_before": before.as_dict(),
        "val_after": after.as_dict(),
        "train": train_fit.as_dict(),
        "val": val_fit.as_dict(),
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "assistant_tokens_trained": train_fit.assistant_tokens_trained,
        "assistant_tokens_cut": train_fit.assistant_tokens_cut,
        "windows": train_fit.windows,
        "resumed_from_step": checkpointing.resumed_step,
        "params": dataclasses.asdict(params),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def make_trainer(model, tokenizer, train_windows: list[dict], params: SFTParams, dtype: torch.dtype | None,
                 scratch_dir: str | None, monitor: TrainerCallback | None = None,
                 checkpointing: TrainerCheckpoints | None = None):
    """trl's SFTTrainer on already fitted windows: no re-tokenizing, no relabelling, no truncation. It saves
    nothing into `scratch_dir` unless `checkpointing` (which then names the folder) is given."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    saving = checkpointing.trainer_args() if checkpointing else {"output_dir": scratch_dir, "save_strategy": "no"}
    config = params.training_args(
        SFTConfig, dtype,
        **saving,
        max_length=None,  # windows already fit: trl must not truncate again
        assistant_only_loss=False,  # the labels already mask all but the assistant tokens
        train_sampling_strategy="group_by_length",  # batches of similar lengths: little padding
    )
    bound_fused_head_tiles(next(model.parameters()).device)
    callbacks = [callback for callback in (monitor, checkpointing) if callback]
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train_windows),
                         processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # TrainingMonitor shows the losses
    return trainer


def save_chat_model(model, tokenizer, output_dir: str | Path) -> None:
    """Model (safetensors) + tokenizer + a generation config that stops at the end of a turn."""
    model.generation_config = generation_config(tokenizer)
    with atomic_path(output_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
