"""Log-probabilities of chosen tokens without a full-vocabulary log-softmax over the whole batch at once.

With SmolLM2's 49,153-token vocabulary, 32 sequences of 256 tokens have 400M logits: 0.8 GB in bf16, and the fp32
copy and its log-softmax held 3.2 GB more at once. Here a model computes logits only at the positions that are
scored (`scored_logits`, transformers' `logits_to_keep`: never over a prompt), and the fp32 log-softmax runs a chunk
of positions at a time (at most CHUNK_ELEMENTS logits), each chunk reduced to the chosen tokens' log-probabilities
before the next is upcast. A position's log-softmax does not depend on the other positions, so the results are
those of the full computation; the tests check it against log_softmax(logits.float()).gather(…).
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24  # logits upcast to fp32 at once: 64 MB


def position_chunks(logits: torch.Tensor) -> list[slice]:
    """Slices of the position axis of `logits` [batch, positions, vocab], each at most CHUNK_ELEMENTS logits
    (one position at least)."""
    batch, positions, vocab = logits.shape
    step = max(1, CHUNK_ELEMENTS // (batch * vocab))
    return [slice(start, start + step) for start in range(0, positions, step)]


def chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `targets` [batch, positions], in fp32, whatever the logits' dtype."""
    parts = []
    for chunk in position_chunks(logits):
        log_probs = torch.log_softmax(logits[:, chunk].float() / temperature, dim=-1)
        parts.append(log_probs.gather(-1, targets[:, chunk].unsqueeze(-1)).squeeze(-1))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The entropy of softmax(logits / temperature) per position [batch, positions], fp32; without gradient (it is
    logged, never trained on, so its graph need not be kept)."""
    parts = []
    for chunk in position_chunks(logits):
        log_probs = torch.log_softmax(logits[:, chunk].float() / temperature, dim=-1)
        parts.append(-(log_probs.exp() * log_probs).sum(-1))
    return torch.cat(parts, dim=1)


def scored_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_target: int,
                  **forward) -> torch.Tensor:
    """The logits that predict the tokens at columns `first_target` … end of every row: the model computes logits
    at columns `first_target` − 1 … end − 1 only. Returns [batch, columns − first_target, vocab]."""
    keep = input_ids.shape[1] - first_target + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **forward).logits
    return logits[:, :-1]
