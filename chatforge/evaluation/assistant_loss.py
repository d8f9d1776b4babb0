"""Loss of a causal LM on assistant tokens only: the SFT stage's before/after numbers and the evaluate stage's.

Input windows come from `chatforge.training.context_fit` ({"input_ids", "labels"}, -100 where not scored).
The result carries total nats, the number of scored tokens and the UTF-8 bytes of the scored text, so
per-token loss, perplexity and tokenizer-independent bits per byte all follow from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from chatforge.evaluation.stats import bits_per_byte
from chatforge.training.context_fit import IGNORE_INDEX
from chatforge.training.logprobs import target_logprobs
from chatforge.training.runtime import autocast


@dataclass
class AssistantLoss:
    nats: float   # summed negative log-likelihood of the scored tokens
    tokens: int   # scored tokens (assistant content and each turn's <|end|>)
    bytes: int    # UTF-8 bytes of the scored text (special tokens have none)

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nats, self.bytes)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes, "nats": self.nats}


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for: exact for byte-level BPE (one vocab character per byte)."""
    byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        byte_level = all(char in byte_of_char for char in token)
        lengths[token_id] = len(token) if byte_level else len(token.encode("utf-8"))
    return lengths


@torch.no_grad()
def assistant_loss(model, tokenizer, windows: list[dict], batch_size: int = 16,
                   dtype: torch.dtype | None = None) -> AssistantLoss:
    """Summed loss over the labelled tokens of `windows` (fp32 unless an autocast `dtype` is given)."""
    device = next(model.parameters()).device
    byte_lengths = token_byte_lengths(tokenizer).to(device)
    was_training = model.training
    model.eval()
    nats, tokens, n_bytes = 0.0, 0, 0
    ordered = sorted(windows, key=lambda w: len(w["input_ids"]))  # similar lengths batch with little padding
    try:
        for first in range(0, len(ordered), batch_size):
            batch = ordered[first:first + batch_size]
            width = max(len(w["input_ids"]) for w in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, window in enumerate(batch):
                length = len(window["input_ids"])
                input_ids[row, :length] = torch.tensor(window["input_ids"])
                labels[row, :length] = torch.tensor(window["labels"])
                attention_mask[row, :length] = 1
            input_ids, labels, attention_mask = input_ids.to(device), labels.to(device), attention_mask.to(device)
            targets = labels.roll(-1, dims=1)  # position i predicts the token at i + 1
            targets[:, -1] = IGNORE_INDEX
            scored = targets != IGNORE_INDEX
            with autocast(device, dtype):  # logits at the scored positions only, a chunk at a time
                nats -= target_logprobs(model, input_ids, attention_mask, scored, targets).sum().item()
            tokens += int(scored.sum())
            n_bytes += int(byte_lengths[targets[scored]].sum())
    finally:
        model.train(was_training)
    return AssistantLoss(nats=nats, tokens=tokens, bytes=n_bytes)
