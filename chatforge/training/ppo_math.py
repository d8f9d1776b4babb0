"""The arithmetic of PPO for RLHF, on plain tensors, so each piece is tested on hand-computed values.

Shapes: `[batch, response_tokens]` with a `mask` that is 1 on real response tokens and 0 on padding.
Padded entries never contribute: they are masked out before any sum, whatever they hold.
"""
from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the real entries; with `count`, the masked sum over `count` entries instead: this part's share
    of the mean over a whole batch that has `count` real entries (micro-batches' shares add up to the batch mean)."""
    return (values * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance over the real entries (and centre unless `shift_mean` is False); padding -> 0."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation over the response tokens; returns (advantages, returns).

    A response ends at its last real token: the value after it is 0 (the episode is over), and
    padded positions get advantage 0 and return 0 whatever `rewards`/`values` hold there.
    """
    rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_real = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value * next_real - values[:, t]
        running = (delta + gamma * lam * next_real * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, never negative).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1 or k3")


def shaped_scores(
    raw_scores: torch.Tensor, ended: torch.Tensor, mean: float, std: float, missing_end_penalty: float
) -> torch.Tensor:
    """Reward-model scores in units of the chosen replies' spread, minus a penalty for replies that never ended."""
    return (raw_scores - mean) / std - missing_end_penalty * (~ended).float()


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * KL on every real token, plus the sequence score on its last real token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float, token_count=None):
    """Clipped surrogate objective (as a loss) and its diagnostics. With `token_count`, the loss is these rows'
    share of the mean over a minibatch of `token_count` tokens (`masked_mean`); the diagnostics are these rows'."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, token_count)
    with torch.no_grad():
        stats = {
            "policy_clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask, unbiased=False),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range: float, token_count=None):
    """Clipped value loss: the new value may not move more than `clip_range` from the rollout's value.
    `token_count` as in `policy_loss`."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask, token_count)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, samples: int) -> None:
        pass


class AdaptiveKLController:
    """Proportional control of the KL coefficient toward `target` (Ziegler et al., 2019).

    The proportional error is clipped to +-20% and the multiplier to [0.8, 1.2], so one update moves the
    coefficient at most 20%; at KL == target it does not move.
    """

    max_change = 0.2

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -self.max_change), self.max_change)
        change = min(max(error * samples / self.horizon, -self.max_change), self.max_change)
        self.value *= 1.0 + change
