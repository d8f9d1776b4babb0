"""Chunked log-probabilities equal the full-vocabulary computation: the helpers, PPO's response log-probs (with
their gradient and entropy), DPO's completion log-probs, the assistant loss and evaluate's KL, on tiny models,
chunk boundaries included. The paths that project hidden states a few rows at a time (`scored_rows`) agree with
the full logits to float rounding (a matmul over fewer rows may round differently), not bit for bit."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from chatforge import logprobs
from chatforge.training.dpo import completion_logps
from chatforge.logprobs import chosen_logprobs, entropy, position_chunks, scored_logits
from chatforge.training.rl import make_rollout, position_ids, response_logprobs
from chatforge.runtime import autocast

FP32, BF16 = autocast(torch.device("cpu"), None), autocast(torch.device("cpu"), torch.bfloat16)
QUERIES = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [26, 27, 28]]
RESPONSES = [[30, 31, 32, 33, 34, 35, 36, 37, 38], [40, 41, 42], [44], [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60]]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 positions for a batch of 4 rows over the tiny tokenizer's vocabulary, so every path crosses
    several chunk boundaries."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 4 * 3 * 320)


def full_vocabulary(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """What chatforge computed before: one log-softmax of the whole batch in fp32."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def test_chunks_cover_every_position_once_within_the_budget(small_chunks):
    logits = torch.zeros(4, 10, 320)
    chunks = position_chunks(logits)
    assert [(chunk.start, chunk.stop) for chunk in chunks] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert position_chunks(torch.zeros(8, 10, 320)) == [slice(start, start + 1) for start in range(10)]  # one at least


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chosen_logprobs_and_entropy_equal_the_full_log_softmax(small_chunks, dtype):
    torch.manual_seed(0)
    logits, targets = (torch.randn(4, 10, 320) * 4).to(dtype), torch.randint(0, 320, (4, 10))
    full = full_vocabulary(logits, 0.7)
    assert torch.equal(chosen_logprobs(logits, targets, 0.7), full.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    assert torch.equal(entropy(logits, 0.7), -(full.exp() * full).sum(-1))


def test_the_gradient_through_chunks_equals_the_full_log_softmax_gradient(small_chunks):
    torch.manual_seed(0)
    logits, targets, weights = torch.randn(4, 10, 320), torch.randint(0, 320, (4, 10)), torch.randn(4, 10)
    chunked, full = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    (chosen_logprobs(chunked, targets, 0.7) * weights).sum().backward()
    (full_vocabulary(full, 0.7).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * weights).sum().backward()
    assert torch.allclose(chunked.grad, full.grad, atol=1e-7)
    assert not entropy(chunked).requires_grad  # logged only: no graph kept


def test_scored_logits_are_the_full_logits_at_the_scored_positions(tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer)
    ids = torch.tensor([QUERIES[2], QUERIES[2][::-1]])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        scored = scored_logits(model, ids, torch.ones_like(ids), first_target=5)
    assert scored.shape == (2, ids.shape[1] - 5, len(tiny_tokenizer)) and torch.equal(scored, full[:, 4:-1])


@pytest.mark.parametrize("cast", [FP32, BF16], ids=["fp32", "bf16"])
def test_ppo_response_logprobs_and_entropy_equal_the_full_vocabulary_computation(tiny_tokenizer, small_chunks, cast):
    model = make_tiny_llama(tiny_tokenizer)
    rollout = make_rollout(QUERIES, RESPONSES, tiny_tokenizer.pad_token_id, end_id=3)
    mask = rollout.attention_mask
    with torch.no_grad():
        with cast:
            logits = model(input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        full = full_vocabulary(logits[:, rollout.response_start - 1:-1], 0.7)
        chosen, per_token_entropy = response_logprobs(model, rollout, 0.7, cast, with_entropy=True)
    assert torch.equal(chosen, full.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1))
    assert torch.equal(per_token_entropy, -(full.exp() * full).sum(-1))


def test_dpo_completion_logps_equal_the_full_vocabulary_computation(tiny_tokenizer, small_chunks):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model = make_tiny_llama(tiny_tokenizer)
    rows = [{"prompt_ids": QUERIES[i], "chosen_ids": RESPONSES[i], "rejected_ids": RESPONSES[3 - i]} for i in (0, 2)]
    batch = DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id)(rows)
    for cast in (FP32, BF16):
        with torch.no_grad(), cast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            full = full_vocabulary(logits[:, :-1]).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
            expected = (full * batch["completion_mask"][:, 1:]).sum(1)
            assert torch.allclose(completion_logps(model, batch), expected, rtol=1e-5, atol=1e-4)


def scored_positions(ids: torch.Tensor) -> torch.Tensor:
    """A ragged pattern of scored positions, the last column never (it predicts nothing)."""
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[0, 2:5], scored[1, 0:1], scored[1, 6:-1] = True, True, True
    return scored


@pytest.mark.parametrize("wrap", ["plain", "lora", "softcapped"])
def test_target_logprobs_equal_the_full_log_softmax_at_the_scored_positions(tiny_tokenizer, small_chunks, wrap):
    model = make_tiny_llama(tiny_tokenizer)
    if wrap == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    if wrap == "softcapped":  # logits are more than the head: the model's own logits are used
        model.config.final_logit_softcapping = 30.0
        assert logprobs.plain_head(model) is None
    ids = torch.tensor([QUERIES[2], QUERIES[2][::-1]])
    mask, scored = torch.ones_like(ids), scored_positions(ids)
    targets = ids.roll(-1, dims=1)
    with torch.no_grad():
        full = full_vocabulary(model(input_ids=ids, attention_mask=mask).logits)
        chunked = logprobs.target_logprobs(model, ids, mask, scored, targets)
    expected = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[scored]
    assert chunked.shape == (int(scored.sum()),) and torch.allclose(chunked, expected, atol=1e-5)


def test_assistant_loss_equals_cross_entropy_over_the_full_logits(tiny_tokenizer, small_chunks):
    from chatforge.lm_loss import assistant_loss

    model = make_tiny_llama(tiny_tokenizer)
    windows = [{"input_ids": QUERIES[i] + RESPONSES[i], "labels": [-100] * len(QUERIES[i]) + RESPONSES[i]}
               for i in range(4)]
    expected = 0.0
    with torch.no_grad():
        for window in windows:
            ids, labels = torch.tensor([window["input_ids"]]), torch.tensor([window["labels"]])
            logits = model(input_ids=ids).logits
            expected += float(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum"))
    result = assistant_loss(model, tiny_tokenizer, windows, batch_size=3)
    assert result.tokens == sum(len(r) for r in RESPONSES) and abs(result.nats - expected) < 1e-3


def test_evaluate_kl_equals_the_full_distributions(tiny_tokenizer, small_chunks):
    from types import SimpleNamespace

    from chatforge.evaluation.evaluate import kl_along_replies
    from chatforge.inference.prompting import prompt_ids

    model, reference = make_tiny_llama(tiny_tokenizer, seed=0), make_tiny_llama(tiny_tokenizer, seed=1)
    conversations = [[{"role": "user", "content": text}] for text in ("hi there", "what is a computer", "ok")]
    replies = [SimpleNamespace(token_ids=RESPONSES[i]) for i in range(3)]
    expected = []
    with torch.no_grad():
        for messages, reply in zip(conversations, replies):
            prompt = prompt_ids(tiny_tokenizer, messages)
            ids = torch.tensor([prompt + reply.token_ids])
            log_p, log_q = (full_vocabulary(m(input_ids=ids).logits)[0, len(prompt) - 1:-1] for m in (model, reference))
            expected.append(float((log_p.exp() * (log_p - log_q)).sum()))
    kl = kl_along_replies(model, reference, tiny_tokenizer, conversations, replies, batch_size=2)
    assert abs(kl - sum(expected) / len(expected)) < 1e-4
