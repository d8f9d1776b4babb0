"""`reward.freeze_backbone`: the score head as a linear probe on the SFT model's own features, fitted once.

With the backbone frozen, every step of trl's RewardTrainer recomputes the same features: the probe on ~1k
HH-RLHF pairs took 51 minutes on 2 cores that way (docs/pretrained.md). Here each sequence's pooled feature
(the last non-pad hidden state, which the score head reads) is computed once, and the head is fitted as an
L2-regularized Bradley-Terry model, a logistic regression on chosen − rejected features: convex, full batch,
L-BFGS, seconds. Its one knob, the L2 strength, is chosen from `reward.probe_l2` by k-fold cross-validation on
the train pairs, so the val pairs stay unseen until the report. Scores are not centred (PPO normalizes them
with the report's chosen-score mean and std).
"""
from __future__ import annotations

import random

import torch

from chatforge.console import progress
from chatforge.errors import ChatforgeError
from chatforge.reward_model import encode_conversation

FOLDS = 5


@torch.no_grad()
def pooled_features(model, tokenizer, sequences: list[list[dict]], max_length: int, batch_size: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """[len(sequences), hidden] fp32: the backbone's last hidden state at each sequence's last token, as the
    score head reads it (sequences are right-padded; the pad id differs from every real last token)."""
    backbone = getattr(model, model.base_model_prefix)
    encoded = [encode_conversation(tokenizer, turns, max_length) for turns in sequences]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    features = torch.zeros(len(encoded), model.config.hidden_size)
    with progress(transient=True) as bar:
        task = bar.add_task("reward features", total=len(encoded), info="")
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, index in enumerate(rows):
                ids[row, :len(encoded[index])] = torch.tensor(encoded[index])
                mask[row, :len(encoded[index])] = 1
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            last = mask.sum(dim=1) - 1
            features[rows] = hidden[torch.arange(len(rows)), last.to(device)].float().cpu()
            bar.advance(task, len(rows))
    return features


def fit_head(differences: torch.Tensor, l2: float) -> torch.Tensor:
    """w minimizing mean softplus(−d·w) + l2/2 ‖w‖² (chosen − rejected features d): Bradley-Terry, no bias."""
    weight = torch.zeros(differences.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-differences @ weight).mean() + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


def accuracy(differences: torch.Tensor, weight: torch.Tensor) -> float:
    return float(((differences @ weight) > 0).float().mean())


def cross_validated(differences: torch.Tensor, candidates: list[float], seed: int) -> dict[float, float]:
    """Mean held-out accuracy of each L2 strength over FOLDS folds of the pairs (a seeded split)."""
    indices = list(range(len(differences)))
    random.Random(seed).shuffle(indices)
    folds = [indices[k::FOLDS] for k in range(FOLDS)]
    scores = {}
    for l2 in candidates:
        held = []
        for fold in folds:
            train = torch.tensor(sorted(set(indices) - set(fold)))
            held.append(accuracy(differences[fold], fit_head(differences[train], l2)))
        scores[l2] = sum(held) / len(held)
    return scores


def fit_probe(model, tokenizer, pairs: list[dict], candidates: list[float], max_length: int, batch_size: int,
              seed: int, dtype: torch.dtype | None = None) -> dict:
    """Fit `model.score` (in place) on `pairs`; returns what was chosen and how the candidates did."""
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise ChatforgeError(f"reward.freeze_backbone: {type(model).__name__} has no linear `score` head to fit "
                             "alone; set freeze_backbone: false")
    chosen = pooled_features(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], max_length, batch_size,
                             dtype)
    rejected = pooled_features(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], max_length,
                               batch_size, dtype)
    differences = chosen - rejected
    scores = cross_validated(differences, candidates, seed) if len(candidates) > 1 else {candidates[0]: None}
    best = max(candidates, key=lambda l2: (scores[l2] or 0.0, l2))  # ties: the stronger regularization
    weight = fit_head(differences, best)
    with torch.no_grad():
        model.score.weight.copy_(weight[None, :].to(model.score.weight))
    return {"l2": best, "cv_accuracy": {str(l2): score for l2, score in scores.items()},
            "train_accuracy": accuracy(differences, weight)}
