"""LoRA (peft) for sft, reward and ppo: the params, wrapping a model, merging, and the base model underneath.

`lora: null` in a stage's params means full fine-tuning. With a mapping, the stage trains low-rank adapters
on the named linear layers ("all-linear": every one but the output head) and saves the merged model
(`merge_and_unload`), so every artifact loads in plain transformers without peft. A sequence classifier's
score head is new, so it trains in full (peft's `modules_to_save` for SEQ_CLS) and the merge keeps the
trained copy. docs/finetuning.md has the decisions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from chatforge.errors import ChatforgeError
from chatforge.params import require


@dataclass
class LoraParams:
    """`lora` in params.yaml's sft, reward and ppo sections."""

    r: int = 16                      # rank of each adapter
    alpha: float = 32.0              # the update is scaled by alpha / r
    dropout: float = 0.0             # on the adapter's input (ppo turns every dropout off regardless)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # module names, e.g. [q_proj, v_proj]

    def validate(self, section: str) -> None:
        require(self.r >= 1, f"{section}.r", "must be >= 1")
        require(self.alpha > 0, f"{section}.alpha", "must be > 0")
        require(0 <= self.dropout < 1, f"{section}.dropout", "must be in [0, 1)")
        require(self.target_modules != [], f"{section}.target_modules", 'must name a module, or be "all-linear"')


def add_adapters(model: nn.Module, params: LoraParams, key: str, task: Literal["CAUSAL_LM", "SEQ_CLS"] | None = None):
    """`model` as a peft model whose only trainable weights are the adapters (and, for SEQ_CLS, the score head).
    `key` is the params key (e.g. `sft.lora`) that a bad `target_modules` is reported against."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout, bias="none",
                        target_modules=params.target_modules, task_type=task)
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, nn.Linear)})
        reason = str(error).strip().splitlines()[0]
        raise ChatforgeError(f"params.yaml: {key}.target_modules={params.target_modules!r}: {reason}; "
                             f"this model's linear layers are {linear} (or use all-linear)") from None


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_adapters(model):
    """The plain transformers model with the adapters added into its weights; a model without adapters as is."""
    return model.merge_and_unload() if is_peft(model) else model


def describe_trainable(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})"


class AdaptersDisabled:
    """The base model under a peft model, usable where a frozen copy of it would be (PPO's reference): every
    forward and `generate` runs inside `disable_adapter()`, so the base weights sit in memory once."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model.generate(*args, **kwargs)

    def parameters(self):
        return self.peft_model.parameters()

    def to(self, device) -> "AdaptersDisabled":
        self.peft_model.to(device)
        return self
