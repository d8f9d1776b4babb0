"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022), on torch + accelerate.

One step = sample replies to a batch of prompts, score them, then several epochs of clipped PPO updates
of the policy and the critic over minibatches of that batch.

Memory: a minibatch goes through forward and backward in micro-batches of `micro_batch_size` sequences (the
whole minibatch when null), each loss divided by the minibatch's token count, so the accumulated gradient is the
whole minibatch's; clipping and the optimizer step follow once per minibatch. Policy and critic are backpropagated
one after the other (their parameters are disjoint, so the gradients are those of `pg_loss + vf_coef * vf_loss`):
only one model's activations of one micro-batch are held at a time.

Exactness of the importance ratio: the minibatches and their micro-batches are fixed once per rollout batch and
the "old" log-probs and values are computed on exactly those micro-batch tensors (same rows, same padding, same
autocast) by the same function the update uses; only the order of the minibatches is shuffled per epoch. In bf16
a different batch composition can change the numerics, so this is what makes the first minibatch of every update
see ratio == 1 exactly (logged as `first_minibatch_logprob_gap`, always 0).

Checkpoints (every `checkpoint_every` steps) hold what the next step depends on: the trainable weights of
policy and critic (safetensors), the optimizer state (read back with `torch.load(weights_only=True)`), the
RNG states, each process's remaining prompt order and the KL coefficient; a resumed run ends with the same
policy as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge.console import progress
from chatforge.training import ppo_math
from chatforge.training.checkpoints import Checkpoints, load_trainable_state, trainable_state
from chatforge.training.rl import (
    RLParams,
    Rollout,
    generate_rollout,
    response_logprobs,
    response_values,
    sampling_config,
    sequence_scores,
)

LOGGED = ("score", "normalized_score", "kl", "rlhf_reward", "non_score_reward", "approx_kl", "policy_clip_fraction",
          "value_clip_fraction", "ratio_mean", "ratio_var", "entropy", "end_of_turn_rate", "policy_loss",
          "value_loss", "kl_coef", "first_minibatch_logprob_gap", "response_tokens")


@dataclass
class Experience:
    """Rows of a rollout batch with what the rollout fixed for them: old log-probs and values, advantages, returns."""

    rollout: Rollout
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask.float()

    def split(self, rows: int) -> list["Experience"]:
        """Consecutive parts of `rows` rows, as `Rollout.split`."""
        return [Experience(self.rollout.select(part), self.old_logprobs[part], self.old_values[part],
                           self.advantages[part], self.returns[part])
                for part in (slice(start, start + rows) for start in range(0, len(self.rollout), rows))]


@dataclass
class Minibatch:
    """One optimizer step over `rows`, its forward and backward passes run on `micro_batches` (the same rows)."""

    rows: Experience
    micro_batches: list[Experience]


class PPOTrainer:
    def __init__(self, policy, reference, reward_model, critic, tokenizer, params: RLParams,
                 score_mean: float, score_std: float, accelerator, cast):
        self.params, self.tokenizer, self.accelerator, self.cast = params, tokenizer, accelerator, cast
        self.score_mean, self.score_std = score_mean, score_std
        trainable = [p for model in (policy, critic) for p in model.parameters() if p.requires_grad]  # LoRA: adapters
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate)
        self.policy, self.critic, self.optimizer = accelerator.prepare(policy, critic, optimizer)
        self.reference = reference.to(accelerator.device)
        self.reward_model = reward_model.to(accelerator.device)
        self.kl_controller = (
            ppo_math.AdaptiveKLController(params.init_kl_coef, params.target_kl, params.kl_horizon)
            if params.adaptive_kl else ppo_math.FixedKLController(params.init_kl_coef)
        )
        self.generation_config = sampling_config(tokenizer, params.temperature, params.max_new_tokens)
        self.generator = torch.Generator().manual_seed(params.seed + accelerator.process_index)

    # ------------------------------------------------------------ experience

    @torch.no_grad()
    def make_experience(self, rollout: Rollout) -> tuple[list[Minibatch], dict]:
        """Score the rollout, split it into the fixed minibatches and micro-batches, and compute advantages and
        returns; the old log-probs and values are computed per micro-batch, as the update will."""
        p = self.params
        rollout = rollout.select(torch.randperm(len(rollout), generator=self.generator).to(rollout.ended.device))
        raw_scores = sequence_scores(self.reward_model, rollout, self.cast)
        scores = ppo_math.shaped_scores(raw_scores, rollout.ended, self.score_mean, self.score_std,
                                        p.missing_end_penalty)
        micro_size = p.micro_batch_size or p.minibatch_size
        parts = rollout.split(micro_size)
        old_logprobs = torch.cat([response_logprobs(self.policy, part, p.temperature, self.cast) for part in parts])
        ref_logprobs = torch.cat([response_logprobs(self.reference, part, p.temperature, self.cast)
                                  for part in parts])
        old_values = torch.cat([response_values(self.critic, part, self.cast) for part in parts])
        mask = rollout.response_mask.float()
        kl = ppo_math.kl_per_token(old_logprobs, ref_logprobs, p.kl_estimator) * mask
        rewards = ppo_math.token_rewards(scores, kl, mask, self.kl_controller.value)
        if p.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo_math.gae(rewards, old_values, mask, p.gamma, p.lam)
        advantages = ppo_math.masked_whiten(advantages, mask)
        experience = Experience(rollout, old_logprobs, old_values, advantages, returns)
        minibatches = [Minibatch(rows, rows.split(micro_size)) for rows in experience.split(p.minibatch_size)]
        sequence_kl = kl.sum(1)
        non_score = -self.kl_controller.value * sequence_kl
        stats = {
            "score": raw_scores.mean().item(),
            "normalized_score": scores.mean().item(),
            "kl": sequence_kl.mean().item(),
            "non_score_reward": non_score.mean().item(),
            "rlhf_reward": (scores + non_score).mean().item(),
            "end_of_turn_rate": rollout.ended.float().mean().item(),
            "response_tokens": mask.sum(1).mean().item(),
        }
        return minibatches, stats

    # ------------------------------------------------------------ update

    def update(self, minibatches: list[Minibatch]) -> dict:
        p = self.params
        totals: dict[str, float] = {}
        first_gap = None
        for _ in range(p.ppo_epochs):
            for index in torch.randperm(len(minibatches), generator=self.generator).tolist():
                batch, rows = minibatches[index], minibatches[index].rows
                self.optimizer.zero_grad()
                token_count = rows.mask.sum()
                outputs = [self.accumulate_gradients(micro, token_count, sync=micro is batch.micro_batches[-1])
                           for micro in batch.micro_batches]
                self.accelerator.clip_grad_norm_(self.policy.parameters(), p.max_grad_norm)
                self.accelerator.clip_grad_norm_(self.critic.parameters(), p.max_grad_norm)
                self.optimizer.step()
                # The logged figures are those of the whole minibatch, from its micro-batches' outputs put together.
                logprobs, values, entropy = (torch.cat(output) for output in zip(*outputs))
                if first_gap is None:
                    first_gap = ((logprobs - rows.old_logprobs).abs() * rows.mask).max().item()
                pg_loss, pg_stats = ppo_math.policy_loss(logprobs, rows.old_logprobs, rows.advantages, rows.mask,
                                                         p.clip_range)
                vf_loss, vf_stats = ppo_math.value_loss(values, rows.old_values, rows.returns, rows.mask,
                                                        p.value_clip_range)
                step_stats = {**pg_stats, **vf_stats, "policy_loss": pg_loss, "value_loss": vf_loss,
                              "entropy": ppo_math.masked_mean(entropy, rows.mask)}
                for key, value in step_stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
        count = p.ppo_epochs * len(minibatches)
        return {**{key: value / count for key, value in totals.items()}, "first_minibatch_logprob_gap": first_gap}

    def accumulate_gradients(self, micro: Experience, token_count: torch.Tensor, sync: bool):
        """Forward and backward one micro-batch, its losses divided by its minibatch's `token_count`, so that the
        gradients add up to those of the minibatch's masked means. Returns its log-probs, values and entropy
        (detached). Under DDP, gradients are all-reduced on the minibatch's last micro-batch (`sync`) only."""
        p = self.params
        with self.gradient_sync(self.policy, sync):
            logprobs, entropy = response_logprobs(self.policy, micro.rollout, p.temperature, self.cast,
                                                  with_entropy=True)
            pg_loss, _ = ppo_math.policy_loss(logprobs, micro.old_logprobs, micro.advantages, micro.mask,
                                              p.clip_range, token_count)
            self.accelerator.backward(pg_loss)
        with self.gradient_sync(self.critic, sync):
            values = response_values(self.critic, micro.rollout, self.cast)
            vf_loss, _ = ppo_math.value_loss(values, micro.old_values, micro.returns, micro.mask, p.value_clip_range,
                                             token_count)
            self.accelerator.backward(p.vf_coef * vf_loss)
        return logprobs.detach(), values.detach(), entropy

    def gradient_sync(self, model, sync: bool):
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def step(self, queries: list[list[int]], seed: int) -> dict:
        policy = self.accelerator.unwrap_model(self.policy)
        rollout = generate_rollout(policy, self.tokenizer, queries, self.generation_config, seed, self.cast)
        minibatches, stats = self.make_experience(rollout)
        stats.update(self.update(minibatches))
        stats["kl_coef"] = self.kl_controller.value
        stats = {key: self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), "mean").item()
                 for key, value in stats.items()}
        self.kl_controller.update(stats["kl"], len(queries) * self.accelerator.num_processes)
        return stats

    def train(self, prompts: list[dict], live=None, checkpoints: Checkpoints | None = None,
              resume_from: Path | None = None):
        """`steps` PPO steps over the prompts (this process's shard, reshuffled each pass), from checkpoint
        `resume_from` when given, checkpointing into `checkpoints`; returns the policy."""
        p, acc = self.params, self.accelerator
        shard = [prompt["ids"] for prompt in prompts[acc.process_index :: acc.num_processes]]
        start, order = self.load_checkpoint(resume_from) if resume_from else (0, [])
        with progress() as bar:
            task = bar.add_task("ppo", total=p.steps, completed=start, info="")
            for step in range(start, p.steps):
                while len(order) < p.batch_size:
                    order += torch.randperm(len(shard), generator=self.generator).tolist()
                batch, order = order[: p.batch_size], order[p.batch_size :]
                stats = self.step([shard[i] for i in batch], seed=p.seed + 7919 * step + acc.process_index)
                if live is not None and acc.is_main_process:
                    live.step = step
                    for key in LOGGED:
                        live.log_metric(f"train/{key}", stats[key])
                    live.next_step()
                bar.update(task, advance=1, info=f"score {stats['score']:+.3f} kl {stats['kl']:.2f} "
                                                 f"eot {stats['end_of_turn_rate']:.0%}")
                if checkpoints is not None and (step + 1) % p.checkpoint_every == 0 and step + 1 < p.steps:
                    self.save_checkpoint(checkpoints, step + 1, order)
        return acc.unwrap_model(self.policy)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, checkpoints: Checkpoints, step: int, order: list[int]) -> None:
        from safetensors.torch import save_file

        acc, rank = self.accelerator, self.accelerator.process_index
        folder = checkpoints.staging(step, fresh=acc.is_main_process)
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_file(trainable_state(acc.unwrap_model(self.policy)), str(folder / "policy.safetensors"))
            save_file(trainable_state(acc.unwrap_model(self.critic)), str(folder / "critic.safetensors"))
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        save_file({"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
                  str(folder / f"rng_{rank}.safetensors"))
        (folder / f"order_{rank}.json").write_text(json.dumps(order), encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            checkpoints.commit(folder, step, {"kl_coef": self.kl_controller.value})
        acc.wait_for_everyone()

    def load_checkpoint(self, folder: Path) -> tuple[int, list[int]]:
        """Restore a checkpoint written by `save_checkpoint`; returns (its step, this process's prompt order)."""
        from safetensors.torch import load_file

        acc, rank = self.accelerator, self.accelerator.process_index
        load_trainable_state(acc.unwrap_model(self.policy), load_file(folder / "policy.safetensors"))
        load_trainable_state(acc.unwrap_model(self.critic), load_file(folder / "critic.safetensors"))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        rng = load_file(folder / f"rng_{rank}.safetensors")
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        state = Checkpoints.state(folder)
        self.kl_controller.value = state["kl_coef"]
        return state["step"], json.loads((folder / f"order_{rank}.json").read_text(encoding="utf-8"))
