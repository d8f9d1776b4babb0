"""Hugging Face Trainer logs to dvclive, shared by the Trainer-based stages (reward, grpo/rloo)."""
from __future__ import annotations

from transformers import TrainerCallback


class LiveCallback(TrainerCallback):
    """Trainer logs → dvclive, stepped by the optimizer step (not by log event), train/ and eval/ prefixes."""

    SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}

    def __init__(self, live, bar=None, task=None):
        """`live` may be None on processes other than the main one; `bar`/`task`: an optional rich progress."""
        self.live, self.bar, self.task = live, bar, task

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is None or not state.is_world_process_zero or not logs:
            return
        self.live.step = state.global_step
        for key, value in logs.items():
            if key in self.SUMMARY_KEYS or not isinstance(value, (int, float)) or key == "epoch":
                continue
            name = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
            self.live.log_metric(name, float(value))
        self.live.make_summary()
        if self.bar is not None and "loss" in logs:
            accuracy = logs.get("accuracy", logs.get("rewards/accuracies", float("nan")))  # reward, DPO
            self.bar.update(self.task, info=f"loss {logs['loss']:.3f} acc {accuracy:.2f}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)
