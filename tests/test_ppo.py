"""PPO for RLHF: the math on hand-computed values, and the trainer on tiny random models."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from chatforge.inference.batch import position_ids
from chatforge.prompts import build_prompts
from chatforge.runtime import autocast
from chatforge.tokenization import end_of_turn_id
from chatforge.training import ppo_math
from chatforge.training.rl import (
    RLParams,
    ScoreHeadModel,
    disable_dropout,
    freeze,
    make_rollout,
    response_logprobs,
    sequence_scores,
)

BF16 = autocast(torch.device("cpu"), torch.bfloat16)


def make_tiny_classifier(tokenizer, seed: int = 1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id)
    return LlamaForSequenceClassification(config).eval()


def tiny_params(**overrides) -> RLParams:
    defaults = dict(steps=2, batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=8, learning_rate=1e-3,
                    max_prompt_tokens=40, heldout_prompts=4, eval_batch_size=4, num_generations=4)
    return RLParams(**{**defaults, **overrides})


def make_trainer(tokenizer, params: RLParams, cast=BF16):
    from accelerate import Accelerator

    from chatforge.training.ppo import PPOTrainer

    policy = disable_dropout(make_tiny_llama(tokenizer, seed=0))
    reference = freeze(copy.deepcopy(policy))
    classifier = make_tiny_classifier(tokenizer)
    reward_model = freeze(ScoreHeadModel(copy.deepcopy(classifier)))
    critic = disable_dropout(ScoreHeadModel(classifier))
    return PPOTrainer(policy, reference, reward_model, critic, tokenizer, params, score_mean=0.1, score_std=0.5,
                      accelerator=Accelerator(cpu=True), cast=cast)


def prompt_ids(tokenizer, texts):
    from chatforge.inference.prompting import prompt_ids as render_prompt

    return [render_prompt(tokenizer, [{"role": "user", "content": text}]) for text in texts]


PROMPTS = ["Hello!", "How are you today?", "What is your favorite food?", "Can you tell me a joke?",
           "Let us go for a walk.", "Why did the chicken cross the road?", "I like pizza.", "Python?"]


# ---------------------------------------------------------------- GAE and masked statistics

def test_gae_matches_hand_computed_values():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3)
    advantages, returns = ppo_math.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert torch.allclose(advantages, torch.tensor([[0.45125, 0.475, 0.5]]))
    assert torch.allclose(returns, torch.tensor([[0.95125, 0.975, 1.0]]))


def test_gae_lambda_zero_is_one_step_td_and_lambda_one_is_monte_carlo():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3)
    td, _ = ppo_math.gae(rewards, values, mask, gamma=1.0, lam=0.0)
    assert torch.allclose(td, torch.tensor([[0.0, 0.0, 0.5]]))  # r_t + V_{t+1} - V_t
    monte_carlo, returns = ppo_math.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[0.81, 0.9, 1.0]]))  # discounted reward-to-go
    assert torch.allclose(monte_carlo, returns - 0.5)


def test_gae_padding_gets_zero_advantage_whatever_the_pad_holds():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    clean_rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    dirty_rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0, -3.0]])
    clean_values = torch.tensor([[0.5, 0.5, 0.5, 0.0, 0.0]])
    dirty_values = torch.tensor([[0.5, 0.5, 0.5, 9.0, 4.0]])
    clean, clean_returns = ppo_math.gae(clean_rewards, clean_values, mask, 1.0, 0.95)
    dirty, dirty_returns = ppo_math.gae(dirty_rewards, dirty_values, mask, 1.0, 0.95)
    assert torch.equal(clean, dirty) and torch.equal(clean_returns, dirty_returns)
    assert torch.allclose(dirty[0, :3], torch.tensor([0.45125, 0.475, 0.5]))
    assert torch.all(dirty[0, 3:] == 0) and torch.all(dirty_returns[0, 3:] == 0)


def test_masked_statistics_equal_unmasked_on_real_entries():
    torch.manual_seed(0)
    values = torch.randn(4, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]).float()
    real = values[mask.bool()]
    garbage = values.masked_fill(~mask.bool(), 1e6)
    assert torch.allclose(ppo_math.masked_mean(garbage, mask), real.mean())
    assert torch.allclose(ppo_math.masked_var(garbage, mask), real.var())
    assert torch.allclose(ppo_math.masked_var(garbage, mask, unbiased=False), real.var(unbiased=False))
    whitened = ppo_math.masked_whiten(garbage, mask)
    assert torch.allclose(whitened[mask.bool()], (real - real.mean()) / torch.sqrt(real.var() + 1e-8), atol=1e-6)
    assert torch.all(whitened[~mask.bool()] == 0)
    kept_mean = ppo_math.masked_whiten(garbage, mask, shift_mean=False)[mask.bool()]
    assert torch.allclose(kept_mean.mean(), real.mean(), atol=1e-6)


# ---------------------------------------------------------------- losses

def test_zero_advantage_gives_zero_policy_loss_and_gradient():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.5, -0.5]])
    loss, _ = ppo_math.policy_loss(logprobs, old, torch.zeros(1, 3), torch.ones(1, 3), clip_range=0.2)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logprobs.grad == 0)


@pytest.mark.parametrize("advantage, log_ratio", [(1.0, 0.5), (-1.0, -0.5)])
def test_clipped_cases_give_zero_gradient(advantage, log_ratio):
    """A > 0 with ratio > 1 + eps, and A < 0 with ratio < 1 - eps: the objective is flat there."""
    old = torch.tensor([[-1.0]])
    logprobs = (old + log_ratio).clone().requires_grad_(True)
    loss, stats = ppo_math.policy_loss(logprobs, old, torch.tensor([[advantage]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert torch.all(logprobs.grad == 0) and stats["policy_clip_fraction"].item() == 1.0
    unclipped = (old - log_ratio * 0.1).clone().requires_grad_(True)  # inside the trust region
    loss, stats = ppo_math.policy_loss(unclipped, old, torch.tensor([[advantage]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert unclipped.grad.abs().item() > 0 and stats["policy_clip_fraction"].item() == 0.0


def test_value_loss_clips_around_old_values():
    old, returns, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.05]]), torch.ones(1, 2)
    values = torch.tensor([[0.5, 0.1]], requires_grad=True)
    loss, stats = ppo_math.value_loss(values, old, returns, mask, clip_range=0.2)
    loss.backward()
    # first entry: clipped value 0.2 is further from the return than 0.5 -> flat in values; second not clipped
    assert values.grad[0, 0].item() == 0.0 and values.grad[0, 1].item() != 0.0
    assert stats["value_clip_fraction"].item() == 0.5


# ---------------------------------------------------------------- KL and the controller

def test_kl_is_zero_when_policy_equals_reference(tiny_tokenizer):
    policy = disable_dropout(make_tiny_llama(tiny_tokenizer))
    reference = freeze(copy.deepcopy(policy))
    queries = prompt_ids(tiny_tokenizer, PROMPTS[:3])
    rollout = make_rollout(queries, [[5, 6, 7], [8], [9, 10]], tiny_tokenizer.pad_token_id, 3)
    logp = response_logprobs(policy, rollout, 0.7, BF16)
    ref = response_logprobs(reference, rollout, 0.7, BF16)
    for estimator in ("k1", "k3"):
        assert torch.all(ppo_math.kl_per_token(logp, ref, estimator) == 0)


def test_k3_is_never_negative_and_k1_can_be():
    torch.manual_seed(0)
    logp, ref = -torch.rand(1000) * 5, -torch.rand(1000) * 5
    assert torch.all(ppo_math.kl_per_token(logp, ref, "k3") >= 0)
    assert torch.any(ppo_math.kl_per_token(logp, ref, "k1") < 0)


def test_adaptive_kl_controller_holds_at_target_and_moves_at_most_20_percent():
    controller = ppo_math.AdaptiveKLController(0.1, target=2.0, horizon=100)
    controller.update(2.0, samples=64)
    assert controller.value == 0.1
    for kl in (100.0, 0.0, 1e9, 3.0, 1.0):
        before = controller.value
        controller.update(kl, samples=10_000)  # samples >> horizon: the clip is what bounds the step
        assert abs(controller.value / before - 1) <= 0.2 + 1e-12
        assert (controller.value > before) == (kl > 2.0)
    fixed = ppo_math.FixedKLController(0.3)
    fixed.update(50.0, 64)
    assert fixed.value == 0.3


# ---------------------------------------------------------------- rewards and rollouts

def test_score_lands_on_last_real_token_and_kl_penalty_on_every_real_token():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, 0.0, 0.0, 0.0]])
    rewards = ppo_math.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.2 - 1.0, 0.0, 0.0, 0.0]]))


def test_missing_end_penalty_applies_only_when_the_end_is_missing():
    raw = torch.tensor([1.1, 1.1])
    shaped = ppo_math.shaped_scores(raw, torch.tensor([True, False]), mean=0.1, std=0.5, missing_end_penalty=1.5)
    assert torch.allclose(shaped, torch.tensor([2.0, 0.5]))


def test_rollout_cuts_after_first_end_of_turn_and_marks_ended(tiny_tokenizer):
    end, pad = end_of_turn_id(tiny_tokenizer), tiny_tokenizer.pad_token_id
    rollout = make_rollout([[1, 5], [1, 6, 7, 8]], [[9, 10, end, 11, end], [12, 13, 14]], pad, end)
    assert rollout.responses() == [[9, 10, end], [12, 13, 14]]
    assert rollout.ended.tolist() == [True, False]
    assert rollout.query_ids.tolist() == [[pad, pad, 1, 5], [1, 6, 7, 8]]
    assert rollout.response_mask.tolist() == [[1, 1, 1], [1, 1, 1]]


def make_tiny_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_left_padded_logits_with_corrected_positions_equal_unpadded(tiny_tokenizer, architecture):
    model = disable_dropout(make_tiny_llama(tiny_tokenizer) if architecture == "llama"
                            else make_tiny_gpt2(tiny_tokenizer))
    short, long = [1, 20, 30, 40], [1, 50, 60, 70, 80, 90, 100]
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad] * 3 + short, long])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        alone = model(input_ids=torch.tensor([short])).logits
        counting_pads = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(7).expand(2, 7)).logits
    assert torch.allclose(padded[0, 3:], alone[0], atol=1e-5)
    if architecture == "gpt2":  # absolute positions: counting the pads shifts every real token (RoPE is shift-invariant)
        assert not torch.allclose(counting_pads[0, 3:], alone[0], atol=1e-3)


def test_reward_score_is_read_at_last_real_response_token(tiny_tokenizer):
    """Our per-token read of the reward model equals the classifier's own pooled score of the unpadded text."""
    classifier = make_tiny_classifier(tiny_tokenizer)
    reward_model = freeze(ScoreHeadModel(classifier))
    end = end_of_turn_id(tiny_tokenizer)
    queries = prompt_ids(tiny_tokenizer, ["Hi", "What is your favorite food? I like pizza."])
    responses = [[30, 31, end], [40]]
    rollout = make_rollout(queries, responses, tiny_tokenizer.pad_token_id, end)
    scores = sequence_scores(reward_model, rollout, autocast(torch.device("cpu"), None))
    with torch.no_grad():
        for row, (query, response) in enumerate(zip(queries, responses)):
            own = classifier(input_ids=torch.tensor([query + response])).logits[0, 0]
            assert torch.allclose(scores[row], own, atol=1e-5)


def test_prompts_keep_history_drop_oldest_turns_and_skip_what_cannot_fit(tiny_tokenizer):
    turns = [{"role": "user", "content": "Hello! How are you today?"},
             {"role": "assistant", "content": "I am fine, thank you. And you?"},
             {"role": "user", "content": "What is your favorite food?"},
             {"role": "assistant", "content": "I like pizza and pasta."}]
    long_turn = [{"role": "user", "content": "Computers run programs " * 30}]
    counts: dict = {}
    full = build_prompts([{"turns": turns}], tiny_tokenizer, 1000, counts)
    assert [len(p["messages"]) for p in full] == [1, 3] and counts["prompts"] == 2
    fits_one_turn = len(full[0]["ids"]) + 2
    counts = {}
    prompts = build_prompts([{"turns": turns}, {"turns": long_turn}, {"turns": turns}], tiny_tokenizer,
                            fits_one_turn, counts)
    assert [p["messages"] for p in prompts] == [turns[:1], turns[2:3]]
    assert counts == {"prompts": 2, "shortened": 1, "skipped_too_long": 1, "duplicate": 2}
    assert all(len(p["ids"]) <= fits_one_turn for p in prompts)


# ---------------------------------------------------------------- the trainer

def first_minibatch_ratio_stats(trainer, tokenizer) -> list[dict]:
    """Roll out, then recompute the first minibatch's log-probs, a micro-batch at a time as the update does: they
    must equal the rollout's exactly. Returns each micro-batch's ratio statistics."""
    from chatforge.training.rl import generate_rollout

    rollout = generate_rollout(trainer.policy, tokenizer, prompt_ids(tokenizer, PROMPTS), trainer.generation_config,
                               seed=0, cast=BF16)
    minibatches, _ = trainer.make_experience(rollout)
    all_stats = []
    for micro in minibatches[0].micro_batches:
        logprobs = response_logprobs(trainer.policy, micro.rollout, trainer.params.temperature, BF16)
        _, stats = ppo_math.policy_loss(logprobs, micro.old_logprobs, micro.advantages, micro.mask, 0.2)
        assert torch.equal(logprobs * micro.mask, micro.old_logprobs * micro.mask)
        assert stats["ratio_mean"].item() == 1.0 and stats["ratio_var"].item() == 0.0
        all_stats.append(stats)
    assert trainer.update(minibatches)["first_minibatch_logprob_gap"] == 0.0
    return all_stats


@pytest.mark.parametrize("micro_batch_size", [None, 1, 2])
def test_first_minibatch_of_an_update_has_ratio_exactly_one(tiny_tokenizer, micro_batch_size):
    trainer = make_trainer(tiny_tokenizer, tiny_params(micro_batch_size=micro_batch_size))
    for stats in first_minibatch_ratio_stats(trainer, tiny_tokenizer):
        assert stats["approx_kl"].item() == 0.0 and stats["policy_clip_fraction"].item() == 0.0


def test_micro_batches_accumulate_the_same_update_and_stats_as_whole_minibatches(tiny_tokenizer):
    """One optimizer step over a minibatch of 4, in micro-batches of 1 and 2 sequences, against one backward over
    the minibatch (fp32: only the order of float sums differs): the same gradient, parameters and logged figures."""
    fp32 = autocast(torch.device("cpu"), None)
    split = {None: [4], 1: [1, 1, 1, 1], 2: [2, 2]}
    # no gradient clipping: clipping to the same norm would hide a wrongly scaled gradient
    trainers = {size: make_trainer(tiny_tokenizer, tiny_params(batch_size=4, minibatch_size=4, micro_batch_size=size,
                                                               ppo_epochs=1, max_grad_norm=1e9), cast=fp32)
                for size in split}
    whole = trainers[None]
    end = end_of_turn_id(tiny_tokenizer)
    # replies of different lengths: a micro-batch's mean over its own tokens would weigh them differently
    rollout = make_rollout(prompt_ids(tiny_tokenizer, PROMPTS[:4]), [[5, 6, 7, end], [8], list(range(9, 17)), [20, 21]],
                           tiny_tokenizer.pad_token_id, end)
    before = {key: parameter.clone() for key, parameter in whole.policy.named_parameters()}
    results = {}
    for size, trainer in trainers.items():
        minibatches, stats = trainer.make_experience(rollout)
        assert [[len(micro.rollout) for micro in batch.micro_batches] for batch in minibatches] == [split[size]]
        stats.update(trainer.update(minibatches))
        assert stats["first_minibatch_logprob_gap"] == 0.0
        results[size] = stats
    assert any(not torch.equal(parameter, before[key]) for key, parameter in whole.policy.named_parameters())
    for size in (1, 2):
        assert results[size].keys() == results[None].keys()
        for key, value in results[None].items():
            assert results[size][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (size, key)
        for name in ("policy", "critic"):
            expected = dict(getattr(whole, name).named_parameters())
            for key, parameter in getattr(trainers[size], name).named_parameters():
                gradient = expected[key].grad
                assert torch.allclose(parameter.grad, gradient, rtol=1e-5, atol=1e-5 * gradient.abs().max().item()), \
                    (size, name, key)
                # Adam moves each weight by about lr whatever its gradient's size, so rounding in a gradient near
                # its eps (1e-8) shows in the weights at up to ~1% of a step (lr 1e-3)
                assert torch.allclose(parameter, expected[key], rtol=0, atol=1e-5), (size, name, key)


def test_heldout_kl_in_micro_batches_equals_the_whole_batch(tiny_tokenizer):
    from chatforge.training.rl import compare_policies

    policy = disable_dropout(make_tiny_llama(tiny_tokenizer, seed=0))
    sft = freeze(make_tiny_llama(tiny_tokenizer, seed=1))  # another model: a KL that is not 0
    reward_model = freeze(ScoreHeadModel(make_tiny_classifier(tiny_tokenizer)))
    prompts = [{"messages": [{"role": "user", "content": text}], "ids": ids}
               for text, ids in zip(PROMPTS[:4], prompt_ids(tiny_tokenizer, PROMPTS[:4]))]
    fp32 = autocast(torch.device("cpu"), None)
    whole, micro = (compare_policies(policy, sft, reward_model, tiny_tokenizer, prompts,
                                     tiny_params(micro_batch_size=size), 0.1, 0.5, fp32)
                   for size in (None, 1))
    assert micro["kl_to_reference"] == pytest.approx(whole["kl_to_reference"], rel=1e-5)
    assert abs(whole["kl_to_reference"]) > 0.01
    del micro["kl_to_reference"], whole["kl_to_reference"]
    assert micro == whole  # the same replies and scores: only the KL's forward passes are split


def test_heldout_comparison_in_batches_smaller_than_its_examples(tiny_tokenizer):
    from chatforge.training.rl import compare_policies

    policy = disable_dropout(make_tiny_llama(tiny_tokenizer, seed=0))
    sft = freeze(make_tiny_llama(tiny_tokenizer, seed=1))
    reward_model = freeze(ScoreHeadModel(make_tiny_classifier(tiny_tokenizer)))
    prompts = [{"messages": [{"role": "user", "content": text}], "ids": ids}
               for text, ids in zip(PROMPTS, prompt_ids(tiny_tokenizer, PROMPTS))]
    fp32 = autocast(torch.device("cpu"), None)
    small = compare_policies(policy, sft, reward_model, tiny_tokenizer, prompts, tiny_params(eval_batch_size=2),
                             0.1, 0.5, fp32)  # used to fail: the examples were read from the first batch only
    assert small["heldout_prompts"] == 8
    assert [example["prompt"] for example in small["examples"]] == PROMPTS[:5]
    whole = compare_policies(policy, sft, reward_model, tiny_tokenizer, prompts[:2], tiny_params(eval_batch_size=2),
                             0.1, 0.5, fp32)
    assert whole["examples"] == small["examples"][:2]  # the first batch: same prompts, same seed, same replies


def test_micro_batch_size_must_divide_the_minibatch():
    from chatforge.errors import ChatforgeError
    from chatforge.params import from_dict

    assert from_dict(RLParams, {"minibatch_size": 4, "micro_batch_size": None}, "ppo").micro_batch_size is None
    assert from_dict(RLParams, {"minibatch_size": 4, "micro_batch_size": 2}, "ppo").micro_batch_size == 2
    for size in (3, 0, 8):
        with pytest.raises(ChatforgeError, match=rf"ppo\.micro_batch_size \({size}\) must be null or divide"):
            from_dict(RLParams, {"batch_size": 8, "minibatch_size": 4, "micro_batch_size": size}, "ppo")


def test_short_run_trains_policy_and_critic_and_leaves_reference_and_reward_model_untouched(tiny_tokenizer):
    trainer = make_trainer(tiny_tokenizer, tiny_params())
    snapshot = {name: {k: v.clone() for k, v in getattr(trainer, name).state_dict().items()}
                for name in ("policy", "critic", "reference", "reward_model")}
    prompts = [{"ids": ids} for ids in prompt_ids(tiny_tokenizer, PROMPTS)]
    trainer.train(prompts)
    for name in ("reference", "reward_model"):
        after = getattr(trainer, name).state_dict()
        assert all(torch.equal(after[k], v) for k, v in snapshot[name].items()), name
    for name in ("policy", "critic"):
        after = getattr(trainer, name).state_dict()
        assert any(not torch.equal(after[k], v) for k, v in snapshot[name].items()), name
    assert trainer.kl_controller.value != trainer.params.init_kl_coef  # adaptive controller moved


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_algorithms_train_the_policy_with_our_reward_model(tiny_tokenizer, tiny_model_dir, algorithm):
    from transformers import AutoModelForCausalLM

    from chatforge.training.trl_rl import train_with_trl

    # loaded from disk, as in the stage: trl builds its reference model from the policy's path
    policy = disable_dropout(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    reward_model = freeze(ScoreHeadModel(make_tiny_classifier(tiny_tokenizer)))
    reward_before = {k: v.clone() for k, v in reward_model.state_dict().items()}
    prompts = [{"messages": [{"role": "user", "content": t}], "ids": ids}
               for t, ids in zip(PROMPTS, prompt_ids(tiny_tokenizer, PROMPTS))]
    trained = train_with_trl(policy, reward_model, tiny_tokenizer, prompts,
                             tiny_params(algorithm=algorithm, steps=1, ppo_epochs=1), 0.0, 1.0, BF16)
    after = trained.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.equal(reward_model.state_dict()[k], v) for k, v in reward_before.items())


# ---------------------------------------------------------------- LoRA

def test_lora_ppo_first_minibatch_has_ratio_one_and_the_reference_keeps_the_sft_weights(tiny_tokenizer, tiny_model_dir,
                                                                                     tmp_path):
    from accelerate import Accelerator

    from chatforge.training.lora import AdaptersDisabled, LoraParams
    from chatforge.training.ppo import PPOTrainer
    from chatforge.training.rl import load_policy_and_reference, load_reward_and_critic

    make_tiny_classifier(tiny_tokenizer).save_pretrained(tmp_path)
    lora = LoraParams(r=4, alpha=8)
    tokenizer, policy, reference = load_policy_and_reference(tiny_model_dir, lora)
    reward_model, critic = load_reward_and_critic(tmp_path, tokenizer.pad_token_id, lora)
    assert isinstance(reference, AdaptersDisabled) and reference.peft_model is policy  # one copy of the weights
    trainer = PPOTrainer(policy, reference, reward_model, critic, tokenizer, tiny_params(), score_mean=0.1,
                         score_std=0.5, accelerator=Accelerator(cpu=True), cast=BF16)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = [name for model in (policy, critic) for name, p in model.named_parameters() if id(p) in optimized]
    assert names and all("lora_" in name or name.startswith("head.") for name in names)

    assert trainer.policy is policy
    first_minibatch_ratio_stats(trainer, tokenizer)

    from stage_projects import saved_tensors

    base = {name.removeprefix("base_model.model.").replace(".base_layer", ""): tensor
            for name, tensor in policy.state_dict().items() if "lora_" not in name}
    assert all(torch.equal(base[name], tensor) for name, tensor in saved_tensors(tiny_model_dir).items())
    assert any(p.abs().sum() > 0 for name, p in policy.named_parameters() if "lora_B" in name)  # adapters trained


def test_lora_ppo_stage_saves_a_merged_policy_that_plain_transformers_loads(tiny_tokenizer, tmp_path, monkeypatch):
    import json

    from transformers import AutoModelForCausalLM

    from stage_projects import ppo_project, saved_tensors

    ppo_project(tmp_path, tiny_tokenizer, steps=2, lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    monkeypatch.chdir(tmp_path)
    import stages.ppo

    threads = torch.get_num_threads()
    stages.ppo.main()
    torch.set_num_threads(threads)

    sft, tuned = saved_tensors(tmp_path / "models/sft"), saved_tensors(tmp_path / "models/ppo")
    assert tuned.keys() == sft.keys()  # merged: no lora_A/lora_B/base_layer
    assert any(not torch.equal(sft[name], tuned[name]) for name in sft)
    assert torch.equal(sft["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])  # not a LoRA target
    report = json.loads((tmp_path / "reports/ppo.json").read_text())
    assert report["kl_to_reference"] != 0.0 and report["resumed_from_step"] == 0
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "models/ppo")).__name__ == "LlamaForCausalLM"


def test_grpo_with_lora_trains_adapters_that_merge_into_a_plain_model(tiny_tokenizer, tiny_model_dir):
    from chatforge.training.lora import merge_adapters
    from chatforge.training.lora import LoraParams
    from chatforge.training.rl import load_policy_and_reference
    from chatforge.training.trl_rl import train_with_trl

    tokenizer, policy, _ = load_policy_and_reference(tiny_model_dir, LoraParams(r=4, alpha=8))
    plain = {name: tensor.clone() for name, tensor in policy.get_base_model().state_dict().items()
             if "lora_" not in name}
    prompts = [{"messages": [{"role": "user", "content": t}], "ids": ids}
               for t, ids in zip(PROMPTS, prompt_ids(tokenizer, PROMPTS))]
    trained = train_with_trl(policy, freeze(ScoreHeadModel(make_tiny_classifier(tokenizer))), tokenizer, prompts,
                             tiny_params(algorithm="grpo", steps=1, ppo_epochs=1), 0.0, 1.0, BF16)
    merged = merge_adapters(trained).state_dict()
    assert {name.replace(".base_layer", "") for name in plain} == set(merged)
    assert any(not torch.equal(merged[name.replace(".base_layer", "")], tensor) for name, tensor in plain.items())
