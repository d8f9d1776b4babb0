"""The loss of a causal LM, as training and evaluation both measure it: on assistant tokens only (the SFT stage's
before/after numbers and the evaluate stage's), and on every token of a text stream (pretrain's validation and the
evaluate stage's all-token loss, in sliding windows).

Input windows come from `chatforge.chat_windows` ({"input_ids", "labels"}, -100 where not scored).
The result carries total nats, the number of scored tokens and the UTF-8 bytes of the scored text, so
per-token loss, perplexity and tokenizer-independent bits per byte all follow from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from chatforge.chat_windows import IGNORE_INDEX
from chatforge.logprobs import target_logprobs
from chatforge.runtime import autocast
from chatforge.stats import bits_per_byte

if TYPE_CHECKING:
    from chatforge.token_shards import TokenStream


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


# ---------------------------------------------------------------- every token of a text stream

# A 1-D token stream that slices into int64 tensors: a packed tensor, or the token shards on disk.
Stream = Union[torch.Tensor, "TokenStream"]


def pack(token_lists: list[list[int]], eos_id: int) -> torch.Tensor:
    """One stream: `eos r1 eos r2 ... eos rN eos`, so every record token and every boundary is predicted."""
    stream = [eos_id]
    for tokens in token_lists:
        stream.extend(tokens)
        stream.append(eos_id)
    return torch.tensor(stream, dtype=torch.long)


def evaluation_batches(stream: Stream, length: int, batch_size: int, stride: int | None = None):
    """Windows of `length` tokens starting every `stride` (default half a window) that together predict every
    token after the first exactly once: a window scores only the targets its predecessor did not, so after the
    first window each prediction sees at least `length - stride` tokens of context, as in a sliding-window
    perplexity. (Back-to-back windows would predict each window's first tokens from almost nothing.)
    The last window is padded with ignored targets."""
    stride = stride or max(1, length // 2)
    if not 1 <= stride <= length:
        raise ValueError(f"stride {stride} must be in [1, {length}]")
    inputs, targets = [], []
    start, predicted_until = 0, 0  # stream positions up to predicted_until are predicted already
    while predicted_until < len(stream) - 1:
        chunk = stream[start:start + length + 1]
        count, first_new = len(chunk) - 1, predicted_until - start
        x = torch.zeros(length, dtype=torch.long)
        y = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        x[:count] = chunk[:-1]
        y[first_new:count] = chunk[1 + first_new:]
        inputs.append(x)
        targets.append(y)
        predicted_until, start = start + count, start + stride
        if len(inputs) == batch_size:
            yield torch.stack(inputs), torch.stack(targets)
            inputs, targets = [], []
    if inputs:
        yield torch.stack(inputs), torch.stack(targets)


@torch.no_grad()
def evaluate_nats(model, stream: Stream, length: int, batch_size: int, device, dtype) -> tuple[float, int]:
    """(total nats, predicted tokens) of the model over `stream`; logits a chunk of positions at a time
    (`logprobs.target_logprobs`: a 49K vocabulary made 1.6 GB of them per batch)."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for inputs, targets in evaluation_batches(stream, length, batch_size):
        inputs, targets = inputs.to(device), targets.to(device)
        scored = targets != IGNORE_INDEX
        with autocast(device, dtype):
            nats -= float(target_logprobs(model, inputs, None, scored, targets).sum())
        count += int(scored.sum())
    model.train(was_training)
    return nats, count
