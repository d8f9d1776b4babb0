"""What every RLHF algorithm here shares: params, prompts, rollouts, log-probs, values, reward scores, the report.

Layout of a rollout batch: prompts LEFT-padded to a common length P, responses RIGHT-padded to R, so all
responses start at column P. Forward passes get position ids `mask.cumsum(-1) - 1` (clamped at 0), which
makes a left-padded row compute exactly what the unpadded row computes. Log-probs come from
temperature-scaled logits in fp32, whatever the autocast dtype of the matmuls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from chatforge.console import log, progress
from chatforge.errors import ChatforgeError
from chatforge.inference.batch import position_ids
from chatforge.logprobs import chosen_logprobs, entropy, scored_logits
from chatforge.params import require
from chatforge.reward_model import load_reward_classifier
from chatforge.tokenization import end_of_turn_id, load_tokenizer
from chatforge.training.lora import AdaptersDisabled, LoraParams, add_adapters

STAGE = "ppo"


@dataclass
class RLParams:
    """params.yaml `ppo`: one section for ppo and for trl's grpo/rloo, so runs compare with one knob."""

    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    threads: int = 0
    steps: int = 30  # rollout batches, each followed by one PPO update
    batch_size: int = 16  # prompts per rollout batch (per process)
    minibatch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int | None = None  # ppo: sequences per forward/backward, gradients accumulated; null: minibatch
    ppo_epochs: int = 2  # passes over each rollout batch (grpo/rloo: num_iterations)
    learning_rate: float = 2.0e-4
    max_grad_norm: float = 1.0
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    kl_estimator: Literal["k1", "k3"] = "k1"
    init_kl_coef: float = 0.05
    adaptive_kl: bool = True
    target_kl: float = 2.0  # nats per reply, for the adaptive controller
    kl_horizon: int = 10000  # samples
    missing_end_penalty: float = 1.0  # subtracted from the normalized score of a reply without end-of-turn
    temperature: float = 1.0
    max_new_tokens: int = 32
    max_prompt_tokens: int = 96  # also capped at the model context minus max_new_tokens
    num_generations: int = 4  # grpo/rloo: replies per prompt
    heldout_prompts: int = 64  # held-out prompts (val split) for reports/ppo.json
    eval_batch_size: int = 16
    kl_budget: float = 6.0  # nats per reply: the report checks the final policy stays within it
    checkpoint_every: int = 10  # ppo steps between resumable checkpoints (models/ppo_checkpoint)
    lora: LoraParams | None = None  # null: full fine-tuning; a mapping: LoRA on policy and critic, merged when saved

    RENAMED = {"eval_prompts": "heldout_prompts"}  # old key -> new key (as dpo names it): one line names the new

    def validate(self, section: str) -> None:
        for key in ("steps", "batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "max_prompt_tokens",
                    "num_generations", "heldout_prompts", "eval_batch_size", "kl_horizon", "checkpoint_every"):
            require(getattr(self, key) > 0, f"{section}.{key}", "must be > 0")
        require(self.batch_size % self.minibatch_size == 0, f"{section}.batch_size",
                f"({self.batch_size}) must be a multiple of {section}.minibatch_size ({self.minibatch_size})")
        require(self.micro_batch_size is None
                or (self.micro_batch_size > 0 and self.minibatch_size % self.micro_batch_size == 0),
                f"{section}.micro_batch_size",
                f"({self.micro_batch_size}) must be null or divide {section}.minibatch_size ({self.minibatch_size})")
        require(self.batch_size % self.num_generations == 0 or self.algorithm == "ppo", f"{section}.batch_size",
                f"must be a multiple of {section}.num_generations for {self.algorithm}")
        for key in ("learning_rate", "temperature", "target_kl", "clip_range", "value_clip_range", "kl_budget"):
            require(getattr(self, key) > 0, f"{section}.{key}", "must be > 0")
        for key in ("gamma", "lam"):
            require(0 <= getattr(self, key) <= 1, f"{section}.{key}", "must be in [0, 1]")
        require(self.init_kl_coef >= 0, f"{section}.init_kl_coef", "must be >= 0")


# ---------------------------------------------------------------- models

def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout makes old and new log-probs of the same tokens differ; PPO needs them identical."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.eval()


def freeze(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return disable_dropout(model)


class ScoreHeadModel(nn.Module):
    """A sequence-classification model read per token: its score head applied to every hidden state.

    The frozen reward model reads it at the last real token (that is its score); the critic, a separate
    copy initialized from the reward model, reads it at every response position (the value).
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        head = getattr(classifier, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ChatforgeError(
                f"{type(classifier).__name__}: expected a one-label score head `score`; "
                "train the reward model as AutoModelForSequenceClassification(num_labels=1)"
            )
        self.backbone, self.head = classifier.base_model, head

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


# ---------------------------------------------------------------- prompts

# ---------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    """Prompts left-padded to one width, responses right-padded to one width (cut after end-of-turn)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def response_start(self) -> int:
        return self.query_ids.shape[1]

    def __len__(self) -> int:
        return len(self.ended)

    def select(self, rows) -> "Rollout":
        return Rollout(self.query_ids[rows], self.query_mask[rows], self.response_ids[rows],
                       self.response_mask[rows], self.ended[rows])

    def split(self, rows: int) -> list["Rollout"]:
        """Consecutive parts of `rows` rows (the last may have fewer), each keeping the batch's padding."""
        return [self.select(slice(start, start + rows)) for start in range(0, len(self), rows)]

    def responses(self) -> list[list[int]]:
        return [ids[mask.bool()].tolist() for ids, mask in zip(self.response_ids, self.response_mask)]


def make_rollout(queries: list[list[int]], responses: list[list[int]], pad_id: int, end_id: int,
                 device=None) -> Rollout:
    """Pad token lists into a Rollout; each response is cut right after its first end-of-turn token.

    An empty response (the generator stopped at once) keeps one pad token as its only real token, so every
    row has a last real token to carry the score and the generator's choice is still scored as a failure.
    """
    cut, ended = [], []
    for response in responses:
        response = list(response)
        if end_id in response:
            response = response[: response.index(end_id) + 1]
        ended.append(bool(response) and response[-1] == end_id)
        cut.append(response or [pad_id])
    width_q, width_r = max(map(len, queries)), max(map(len, cut))
    query_ids = torch.full((len(queries), width_q), pad_id, dtype=torch.long)
    query_mask = torch.zeros((len(queries), width_q), dtype=torch.long)
    response_ids = torch.full((len(cut), width_r), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(cut), width_r), dtype=torch.long)
    for row, (query, response) in enumerate(zip(queries, cut)):
        query_ids[row, width_q - len(query):] = torch.tensor(query)
        query_mask[row, width_q - len(query):] = 1
        response_ids[row, : len(response)] = torch.tensor(response)
        response_mask[row, : len(response)] = 1
    rollout = Rollout(query_ids, query_mask, response_ids, response_mask, torch.tensor(ended))
    return rollout if device is None else Rollout(*(t.to(device) for t in vars(rollout).values()))


def sampling_config(tokenizer, temperature: float, max_new_tokens: int):
    """Pure temperature sampling: no top-k/top-p/repetition penalty, so replies come from the policy
    the log-probs describe (every field that reshapes the distribution is pinned, not inherited)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, max_new_tokens=max_new_tokens,
        eos_token_id=end_of_turn_id(tokenizer), pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def generate_rollout(policy, tokenizer, queries: list[list[int]], generation_config, seed: int, cast) -> Rollout:
    """Sample one reply per query in one batched `generate` call (left padding; generate derives the
    position ids from the attention mask itself, so none are passed).

    HF `generate` rather than chatforge.inference: a rollout needs the whole batch at once (one KV-cached
    pass for all prompts instead of one conversation at a time), the raw token ids (not re-tokenized text),
    and exactly the sampling that the log-probs describe (temperature only, see `sampling_config`)."""
    device = next(policy.parameters()).device
    pad_id, end_id = tokenizer.pad_token_id, end_of_turn_id(tokenizer)
    padded = make_rollout(queries, [[end_id]] * len(queries), pad_id, end_id, device)
    torch.manual_seed(seed)
    with cast:
        output = policy.generate(
            input_ids=padded.query_ids, attention_mask=padded.query_mask, generation_config=generation_config
        )
    generated = output[:, padded.response_start:].tolist()
    return make_rollout(queries, generated, pad_id, end_id, device)


def response_logprobs(policy, rollout: Rollout, temperature: float, cast, with_entropy: bool = False):
    """Log-probs (fp32, temperature-scaled) of the response tokens; optionally the policy entropy per token (without
    gradient: it is logged). Logits are computed at the response positions only, upcast a chunk at a time."""
    mask = rollout.attention_mask
    with cast:
        logits = scored_logits(policy, rollout.input_ids, mask, rollout.response_start,
                               position_ids=position_ids(mask))
    chosen = chosen_logprobs(logits, rollout.response_ids, temperature)
    if not with_entropy:
        return chosen
    return chosen, entropy(logits, temperature)


def response_values(critic: ScoreHeadModel, rollout: Rollout, cast) -> torch.Tensor:
    """V(state before each response token), read at the hidden state of the token before it."""
    with cast:
        values = critic(rollout.input_ids, rollout.attention_mask)
    return values[:, rollout.response_start - 1 : -1]


@torch.no_grad()
def sequence_scores(reward_model: ScoreHeadModel, rollout: Rollout, cast) -> torch.Tensor:
    """The reward model's raw score of prompt + response, read at the last real response token."""
    with cast:
        per_token = reward_model(rollout.input_ids, rollout.attention_mask)
    last = rollout.response_start + rollout.response_mask.sum(1) - 1
    return per_token[torch.arange(len(rollout)), last]


# ---------------------------------------------------------------- loading

def load_policy_and_reference(path: Path, lora: LoraParams | None = None):
    """(tokenizer, policy, frozen reference). With `lora`, the policy trains adapters and the reference is the
    same model with its adapters disabled, so the SFT weights sit in memory once."""
    from transformers import AutoModelForCausalLM


    if not (path / "config.json").exists():
        raise ChatforgeError(f"{path}: no config.json; run `dvc repro sft` first")
    tokenizer = load_tokenizer(path, stage_hint="sft")
    policy = disable_dropout(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32))
    if lora:
        policy = disable_dropout(add_adapters(policy, lora, f"{STAGE}.lora", task="CAUSAL_LM"))
        return tokenizer, policy, AdaptersDisabled(policy)
    reference = freeze(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32))
    return tokenizer, policy, reference


def load_reward_and_critic(path: Path, pad_token_id: int, lora: LoraParams | None = None):
    """Two independent copies of the reward model: a frozen scorer, and the critic that PPO trains (with `lora`:
    adapters on its transformer, and its score head in full)."""

    def load():
        model = load_reward_classifier(path, dtype=torch.float32)
        model.config.pad_token_id = pad_token_id
        return ScoreHeadModel(disable_dropout(model))

    critic = load()
    if lora:
        critic.backbone = add_adapters(critic.backbone, lora, f"{STAGE}.lora")
    return freeze(load()), disable_dropout(critic)


def score_normalization(report: dict, path: Path) -> tuple[float, float]:
    try:
        mean, std = float(report["chosen_score_mean"]), float(report["chosen_score_std"])
    except (KeyError, TypeError, ValueError):
        raise ChatforgeError(f"{path}: needs numeric chosen_score_mean and chosen_score_std; "
                             "re-run `dvc repro reward`") from None
    if not std > 0 or not math.isfinite(mean):
        raise ChatforgeError(f"{path}: chosen_score_std must be > 0 (got {std}); re-run `dvc repro reward`")
    return mean, std


# ---------------------------------------------------------------- held-out report

@dataclass
class HeldoutReplies:
    """Replies of a trained policy and its reference to the same held-out prompts, per reply in prompt order:
    the KL of the policy's replies to the reference (nats, the k1 estimate summed over the reply), reply tokens,
    whether the reply ended its turn, the reward model's raw score (when one was given), and the first prompts'
    replies as text."""

    kl: torch.Tensor
    tokens: dict[str, torch.Tensor]
    ended: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor] | None
    examples: list[dict]


@torch.no_grad()
def sample_heldout(policy, reference, tokenizer, prompts: list[dict], names: tuple[str, str], temperature: float,
                   max_new_tokens: int, batch_size: int, seed: int, cast, micro_batch_size: int | None = None,
                   reward_model: ScoreHeadModel | None = None, examples: int = 5) -> HeldoutReplies:
    """Sample the policy's and the reference's replies to the same prompts with the same sampling and seeds
    (`batch_size` prompts at a time), measure them, and score them with `reward_model` when given. `names` are the
    two models' names in the examples ({"prompt", names[0], names[1]}); the KL's forward passes run
    `micro_batch_size` rows at a time (memory: logits), the whole batch when None."""
    policy.eval()
    config = sampling_config(tokenizer, temperature, max_new_tokens)
    kl, tokens, ended, scores = [], {name: [] for name in names}, {name: [] for name in names}, {name: [] for name in names}
    replies: dict[str, list[str]] = {name: [] for name in names}
    with progress() as bar:
        task = bar.add_task("held-out replies", total=len(prompts), info="")
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            queries = [p["ids"] for p in batch]
            for name, model in zip(names, (policy, reference)):
                rollout = generate_rollout(model, tokenizer, queries, config, seed + start, cast)
                if reward_model is not None:
                    scores[name].append(sequence_scores(reward_model, rollout, cast).cpu())
                tokens[name].append(rollout.response_mask.sum(1).cpu())
                ended[name].append(rollout.ended.cpu())
                if model is policy:
                    for part in rollout.split(micro_batch_size or len(rollout)):
                        log_ratio = (response_logprobs(policy, part, temperature, cast)
                                     - response_logprobs(reference, part, temperature, cast))
                        kl.append((log_ratio * part.response_mask).sum(1).cpu())
                wanted = max(0, min(examples - start, len(batch)))  # the first `examples` prompts, in any batch
                replies[name] += [tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.responses()[:wanted]]
            bar.update(task, advance=len(batch))
    return HeldoutReplies(
        kl=torch.cat(kl),
        tokens={name: torch.cat(values) for name, values in tokens.items()},
        ended={name: torch.cat(values) for name, values in ended.items()},
        scores={name: torch.cat(values) for name, values in scores.items()} if reward_model is not None else None,
        examples=[{"prompt": prompts[i]["messages"][-1]["content"], **{name: replies[name][i] for name in names}}
                  for i in range(len(replies[names[0]]))],
    )


def compare_policies(policy, sft, reward_model, tokenizer, prompts: list[dict], params: RLParams,
                     score_mean: float, score_std: float, cast) -> dict:
    """PPO and SFT replies to the same held-out prompts (`sample_heldout`), scored by the reward model: the
    report's held-out part."""
    replies = sample_heldout(policy, sft, tokenizer, prompts, ("ppo", "sft"), params.temperature,
                             params.max_new_tokens, params.eval_batch_size, params.seed + 1_000_003, cast,
                             params.micro_batch_size, reward_model, examples=5)
    scores, ended = replies.scores, {name: value.float() for name, value in replies.ended.items()}
    sft_std = scores["sft"].std().item() if len(prompts) > 1 else float("nan")
    difference = scores["ppo"] - scores["sft"]
    mean_kl = replies.kl.mean().item()
    improvement = (scores["ppo"].mean() - scores["sft"].mean()).item() / sft_std if sft_std > 0 else float("nan")
    return {
        "heldout_prompts": len(prompts),
        "ppo_score_mean": scores["ppo"].mean().item(),
        "sft_score_mean": scores["sft"].mean().item(),
        "sft_score_std": sft_std,
        "improvement_in_sft_std": improvement,
        "ppo_normalized_score_mean": (scores["ppo"].mean().item() - score_mean) / score_std,
        "sft_normalized_score_mean": (scores["sft"].mean().item() - score_mean) / score_std,
        "win_rate": ((difference > 0).float() + 0.5 * (difference == 0).float()).mean().item(),
        "kl_to_reference": mean_kl,
        "kl_budget": params.kl_budget,
        "kl_within_budget": mean_kl <= params.kl_budget,
        "ppo_end_of_turn_rate": ended["ppo"].mean().item(),
        "sft_end_of_turn_rate": ended["sft"].mean().item(),
        "examples": replies.examples,
    }


def log_comparison(report: dict) -> None:
    log(STAGE, f"held-out ({report['heldout_prompts']} prompts): RM score PPO {report['ppo_score_mean']:.3f} vs "
               f"SFT {report['sft_score_mean']:.3f} ({report['improvement_in_sft_std']:+.2f} SFT std), "
               f"win rate {report['win_rate']:.1%}, KL {report['kl_to_reference']:.2f} nats "
               f"(budget {report['kl_budget']}), end-of-turn PPO {report['ppo_end_of_turn_rate']:.0%} "
               f"SFT {report['sft_end_of_turn_rate']:.0%}")
