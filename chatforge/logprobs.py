"""Log-probabilities of chosen tokens without a full-vocabulary log-softmax over the whole batch at once.

With SmolLM2's 49,153-token vocabulary, 32 sequences of 256 tokens have 400M logits: 0.8 GB in bf16, and the fp32
copy and its log-softmax held 3.2 GB more at once. Here a model computes logits only at the positions that are
scored (`scored_logits`, transformers' `logits_to_keep`: never over a prompt), and the fp32 log-softmax runs a chunk
of positions at a time (at most CHUNK_ELEMENTS logits), each chunk reduced to the chosen tokens' log-probabilities
before the next is upcast. A position's log-softmax does not depend on the other positions, so the results are
those of the full computation; the tests check it against log_softmax(logits.float()).gather(…).

Where only some positions are scored (an assistant's tokens, a reply), `scored_rows` goes one step further: the
backbone's hidden states at those positions, projected through the LM head a chunk of rows at a time
(`row_logits`), so no [batch, positions, vocab] tensor exists at all.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

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


def plain_head(model):
    """(backbone, LM head) when the model's logits are exactly head(backbone(...).last_hidden_state), as in Llama
    and most causal LMs, through a PEFT wrapper (its adapters live inside both); None when the logits are scaled or
    softcapped after the head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config.get_text_config()
    if any(getattr(config, key, None) not in (None, 1.0) for key in ("final_logit_softcapping", "logit_scale")):
        return None
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()



def scored_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor,
                **forward) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], int]:
    """(rows, head, vocabulary size): `head(rows[i])` are the logits at the i-th True position of `scored`
    [batch, positions], in row-major order. The rows are hidden states and the head is the LM head, so no full
    logits are built; a model whose logits are more than its head (`plain_head`) gives its logits at those
    positions and an identity head."""
    parts = plain_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward).logits
        return logits[scored], lambda rows: rows, logits.shape[-1]
    backbone, head = parts
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **forward).last_hidden_state
    return hidden[scored], head, head.out_features


def row_logits(rows: torch.Tensor, head, vocab: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slice of rows, their logits), at most CHUNK_ELEMENTS logits at a time (one row at least)."""
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, len(rows), step):
        chunk = slice(start, start + step)
        yield chunk, head(rows[chunk])


def target_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor,
                    targets: torch.Tensor, **forward) -> torch.Tensor:
    """[number of scored positions] fp32: the log-softmax of the logits at each True position of `scored` at the
    token that `targets` (the shape of `scored`) names for it; no full-vocabulary logits anywhere."""
    rows, head, vocab = scored_rows(model, input_ids, attention_mask, scored, **forward)
    wanted = targets[scored]
    parts = [torch.log_softmax(logits.float(), dim=-1).gather(-1, wanted[chunk].unsqueeze(-1)).squeeze(-1)
             for chunk, logits in row_logits(rows, head, vocab)]
    return torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)
