"""The knobs that sft, reward and dpo share, checked once and turned into TrainingArguments once.

`SFTParams`, `RewardParams` and `DPOParams` derive from `TrainerParams` and add only their own fields and checks;
each stage builds its trl config (SFTConfig, RewardConfig, DPOConfig, all TrainingArguments) with
`params.training_args(ConfigClass, dtype, **its_own_extras)`. Knobs that drifted between sections carry
transformers' TrainingArguments names (`warmup_steps`, `gradient_accumulation_steps`, `max_grad_norm`,
`eval_steps`); names every section already spells alike stay short (`epochs`, `batch_size`, `eval_batch_size`,
`lr_scheduler`; docs/design.md, Decisions). An old name in params.yaml stops the stage with one line naming the
new one (`RENAMED`, read by `params.from_dict`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from chatforge.params import require
from chatforge.training.lora import LoraParams


@dataclass
class TrainerParams:
    """Fields shared by params.yaml sections `sft`, `reward` and `dpo` (stages on a Hugging Face Trainer)."""

    seed: int = 0
    epochs: float = 1.0                  # passes over the train set (num_train_epochs)
    max_steps: int = 0                   # > 0 overrides epochs
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"         # any transformers SchedulerType: linear, cosine, constant_with_warmup …
    warmup_steps: float = 0.05           # as transformers 5 reads it: < 1 a share of the steps, >= 1 a number of steps
    batch_size: int = 16                 # examples per forward/backward, per device (per_device_train_batch_size) ...
    gradient_accumulation_steps: int = 1  # ... x this per optimizer step
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0           # 0: no clipping
    logging_steps: int = 10
    eval_steps: int = 50                 # val curves every this many optimizer steps
    eval_batch_size: int = 32            # examples per forward pass when evaluating
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 autocast where the CPU/GPU is fast at it
    threads: int = 0                     # torch threads; 0 = one per core
    lora: LoraParams | None = None       # null: full fine-tuning; a mapping: LoRA adapters, merged when saved
    checkpoint_every: int = 100          # optimizer steps between resumable checkpoints (models/<stage>_checkpoint)

    # Old key -> new key: a params.yaml that still uses an old key gets one line naming the new one.
    RENAMED: ClassVar[dict[str, str]] = {}
    # False: the stage evaluates by itself, the Trainer never does (no eval_* TrainingArguments are passed).
    TRAINER_EVALUATES: ClassVar[bool] = True

    def validate(self, section: str) -> None:
        from transformers.trainer_utils import SchedulerType

        require(self.epochs > 0 or self.max_steps > 0, f"{section}.epochs", "must be > 0 (or set max_steps)")
        require(self.max_steps >= 0, f"{section}.max_steps", "must be >= 0")
        require(self.learning_rate > 0, f"{section}.learning_rate", "must be > 0")
        schedulers = [kind.value for kind in SchedulerType]
        require(self.lr_scheduler in schedulers, f"{section}.lr_scheduler", f"must be one of {schedulers}")
        require(self.warmup_steps >= 0 and (self.warmup_steps < 1 or self.warmup_steps == int(self.warmup_steps)),
                f"{section}.warmup_steps", "must be a share of the steps in [0, 1) or a whole number of steps")
        for key in ("batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps", "eval_batch_size",
                    "checkpoint_every"):
            require(getattr(self, key) >= 1, f"{section}.{key}", "must be >= 1")
        require(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
        require(self.max_grad_norm >= 0, f"{section}.max_grad_norm", "must be >= 0 (0 = no clipping)")
        require(self.threads >= 0, f"{section}.threads", "must be >= 0 (0 = one per core)")

    def training_args(self, config_class: type, dtype: torch.dtype | None, **extras: Any):
        """`config_class` (TrainingArguments or a trl config) from the shared knobs; `extras` (the stage's own
        arguments: saving, its trl options) are added and override the shared ones. `dtype` is the autocast dtype
        (None: fp32): on CPU accelerate's bf16 autocast, weights and optimizer stay fp32."""
        args: dict[str, Any] = {
            "seed": self.seed,
            "num_train_epochs": self.epochs,
            "max_steps": self.max_steps or -1,
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": self.lr_scheduler,
            "warmup_steps": self.warmup_steps,
            "per_device_train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "logging_steps": self.logging_steps,
            "bf16": dtype == torch.bfloat16,  # trl's default would be bf16 everywhere, slower on CPUs without it
            "fp16": dtype == torch.float16,
            "use_cpu": not torch.cuda.is_available(),
            "activation_checkpointing": False,  # trl turns it on by default; small models only lose speed with it
            "report_to": "none",
            "disable_tqdm": True,  # the stages show a rich bar
            "dataloader_num_workers": 0,
        }
        if self.TRAINER_EVALUATES:
            args.update(eval_strategy="steps", eval_steps=self.eval_steps,
                        per_device_eval_batch_size=self.eval_batch_size)
        else:
            args["eval_strategy"] = "no"
        return config_class(**{**args, **extras})
