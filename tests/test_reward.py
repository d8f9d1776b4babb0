"""reward: a short RewardTrainer run on the SFT weights separates an easy set; the saved model loads and scores."""
from __future__ import annotations

import json

import pytest
import torch

from chatforge.conversation import preference
from chatforge.reward_model import encode_conversation, load_reward_model, score_conversations
from chatforge.training.reward import RewardParams, load_initial_model, train_reward_model

PROMPTS = ["Hello! How are you today?", "What is your favorite food?", "Can you tell me a joke?",
           "The weather is nice, let us go for a walk.", "Computers run programs.", "And you?",
           "I like pizza and pasta.", "Why did the chicken cross the road?", "Let us go to the park.",
           "Tell me about Python.", "What languages do people use?", "Is it nice today?"]
GOOD = ["I am fine, thank you.", "I like pizza and pasta.", "Why did the chicken cross the road?",
        "The weather is nice today.", "People write programs in Python."]


def separable_pairs(prompts, offset=0):
    """Chosen: a fluent sentence; rejected: one word repeated (the degenerate-repetition strategy)."""
    pairs = []
    for i, text in enumerate(prompts):
        good = GOOD[(i + offset) % len(GOOD)]
        pairs.append(preference(f"p{offset}:{i}", "synthetic", [{"role": "user", "content": text}],
                                [{"role": "assistant", "content": good}],
                                [{"role": "assistant", "content": " ".join([good.split()[0]] * 6)}],
                                meta={"origin": "synthetic", "strategy": "repetition"}))
    return pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("reward")
    params = RewardParams(epochs=8, batch_size=8, learning_rate=3e-3, warmup_steps=0, logging_steps=4, eval_steps=8,
                          max_length=64, center_rewards_coefficient=0.01,
                          threads=1)  # tiny model: a second thread only adds synchronization
    train = separable_pairs(PROMPTS[:9]) + separable_pairs(PROMPTS[:9], offset=2)
    val = separable_pairs(PROMPTS[9:], offset=1)
    threads = torch.get_num_threads()
    report = train_reward_model(tiny_model_dir, train, val, params, out / "model", out / "live")
    torch.set_num_threads(threads)
    return out, report, val


def test_training_separates_held_out_pairs(trained):
    out, report, val = trained
    assert report["accuracy"] == 1.0 and report["mean_margin"] > 0
    assert report["accuracy_by_origin"] == {"synthetic": 1.0}
    assert report["accuracy_by_strategy"] == {"synthetic/repetition": 1.0}
    assert report["val_pairs"] == len(val) and report["parameters"] > 0 and report["wall_seconds"] > 0
    assert report["chosen_score_std"] >= 0 and isinstance(report["chosen_score_mean"], float)
    summary = json.loads((out / "live/metrics.json").read_text())
    assert summary["step"] == report["steps"]  # stepped by optimizer step, not by log event
    assert "eval" in summary and "accuracy" in summary["eval"]


def test_saved_model_loads_in_plain_transformers_and_scores(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, report, val = trained
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    pair = val[0]
    scores = []
    for reply in (pair["chosen"], pair["rejected"]):
        ids = tokenizer.apply_chat_template(pair["prompt"] + reply, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            scores.append(model(**ids).logits[0, 0].item())
    assert scores[0] > scores[1]
    # the shared scoring function agrees with a plain forward pass, batched and padded
    model2, tokenizer2 = load_reward_model(out / "model")
    batch = score_conversations(model2, tokenizer2, [p["prompt"] + r for p in val for r in (p["chosen"], p["rejected"])],
                                batch_size=3)
    assert batch[0] == pytest.approx(scores[0], abs=1e-4) and batch[1] == pytest.approx(scores[1], abs=1e-4)
    assert sum(batch[0::2]) / len(val) == pytest.approx(report["chosen_score_mean"], abs=1e-4)


def test_long_conversations_keep_their_end(tiny_tokenizer):
    turns = [{"role": "user", "content": "Hello! " * 50}, {"role": "assistant", "content": "I am fine."}]
    full = encode_conversation(tiny_tokenizer, turns, 10_000)
    cut = encode_conversation(tiny_tokenizer, turns, 16)
    assert len(cut) == 16 and cut[0] == tiny_tokenizer.bos_token_id and cut[1:] == full[-15:]


def test_missing_models_are_one_line(tmp_path, tiny_tokenizer):
    from chatforge.errors import ChatforgeError

    with pytest.raises(ChatforgeError, match="dvc repro reward"):
        load_reward_model(tmp_path)
    with pytest.raises(ChatforgeError, match="dvc repro sft"):
        load_initial_model(tmp_path, tiny_tokenizer)


def test_bucketed_order_makes_whole_batches_of_similar_length():
    from chatforge.training.reward import bucketed_order

    lengths = [(i * 37) % 100 + 1 for i in range(50)]  # 50 examples, batches of 8: 7 per epoch, last topped up
    order = bucketed_order(lengths, batch_size=8, epochs=2, seed=0)
    assert len(order) == 2 * 7 * 8 and set(order) == set(range(50))
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    real = sum(lengths[i] for i in order)
    padded = sum(8 * max(lengths[i] for i in batch) for batch in batches)
    assert real / padded > 0.75  # random batches would be ~0.5 here
    assert order[:56] != order[56:]  # each epoch its own arrangement
    assert bucketed_order(lengths, 8, 2, 0) == order and bucketed_order(lengths, 8, 2, 1) != order
    assert len(bucketed_order(lengths, 8, 0.5, 0)) == 4 * 8


# 18 pairs: bucketed, one bucket of 8 pairs per optimizer step, 3 an epoch (the last topped up): 2 epochs are 6 steps of
# 2 micro-batches of 4; unbucketed, 5 micro-batches of 4 an epoch, each epoch ending in a short step (3 + 3)
@pytest.mark.parametrize("bucket_by_length, steps", [(True, 6), (False, 6)])
def test_gradient_accumulation_counts_optimizer_steps(tmp_path, tiny_model_dir, bucket_by_length, steps):
    params = RewardParams(epochs=2, batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=0,
                          logging_steps=1, eval_steps=100, max_length=64, threads=1, bucket_by_length=bucket_by_length)
    train = separable_pairs(PROMPTS[:9]) + separable_pairs(PROMPTS[:9], offset=2)
    threads = torch.get_num_threads()
    report = train_reward_model(tiny_model_dir, train, separable_pairs(PROMPTS[9:], offset=1), params,
                                tmp_path / "model", tmp_path / "live")
    torch.set_num_threads(threads)
    assert report["steps"] == steps
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert summary["step"] == report["steps"]  # the Trainer made as many optimizer steps as the stage counted


def test_lora_reward_model_trains_its_score_head_and_saves_a_plain_merged_classifier(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from stage_projects import saved_tensors

    from chatforge.training.lora import LoraParams

    params = RewardParams(epochs=8, batch_size=8, learning_rate=1e-2, warmup_steps=0, logging_steps=4, eval_steps=8,
                          max_length=64, threads=1, lora=LoraParams(r=4, alpha=8))
    train = separable_pairs(PROMPTS[:9]) + separable_pairs(PROMPTS[:9], offset=2)
    val = separable_pairs(PROMPTS[9:], offset=1)
    threads = torch.get_num_threads()
    report = train_reward_model(tiny_model_dir, train, val, params, tmp_path / "model", tmp_path / "live")
    torch.set_num_threads(threads)

    assert report["accuracy"] == 1.0  # the new score head trained (it is not an adapter target)
    sft, tuned = saved_tensors(tiny_model_dir), saved_tensors(tmp_path / "model")
    assert not any("lora" in name or "modules_to_save" in name or "base_layer" in name for name in tuned)
    assert "score.weight" in tuned and "lm_head.weight" not in tuned
    assert torch.equal(tuned["model.embed_tokens.weight"], sft["model.embed_tokens.weight"])  # not a target
    assert not torch.equal(tuned["model.layers.0.self_attn.q_proj.weight"], sft["model.layers.0.self_attn.q_proj.weight"])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model", use_safetensors=True)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1


def test_frozen_backbone_trains_only_the_score_head(tmp_path, tiny_model_dir):
    """freeze_backbone: a linear probe on the initial model's features; every backbone weight is saved as it came."""
    from stage_projects import saved_tensors

    params = RewardParams(epochs=8, batch_size=8, learning_rate=1e-2, warmup_steps=0, logging_steps=4, eval_steps=8,
                          max_length=64, threads=1, freeze_backbone=True)
    train = separable_pairs(PROMPTS[:9]) + separable_pairs(PROMPTS[:9], offset=2)
    val = separable_pairs(PROMPTS[9:], offset=1)
    threads = torch.get_num_threads()
    report = train_reward_model(tiny_model_dir, train, val, params, tmp_path / "model", tmp_path / "live")
    torch.set_num_threads(threads)

    sft, tuned = saved_tensors(tiny_model_dir), saved_tensors(tmp_path / "model")
    backbone = [name for name in tuned if name != "score.weight"]
    assert backbone and all(torch.equal(tuned[name], sft[name]) for name in backbone)
    assert report["mean_margin"] > 0 and report["accuracy"] >= 0.75  # the head alone learned the easy set


def test_frozen_backbone_with_lora_is_a_params_error():
    from chatforge.errors import ChatforgeError
    from chatforge.training.lora import LoraParams

    with pytest.raises(ChatforgeError, match="reward.freeze_backbone"):
        RewardParams(freeze_backbone=True, lora=LoraParams()).validate("reward")


def test_the_probes_features_are_what_the_saved_classifier_scores(tmp_path, tiny_model_dir):
    """The probe fits on pooled features computed once; the saved model must score exactly features · w."""
    from chatforge.training.reward_probe import pooled_features

    params = RewardParams(max_length=64, threads=1, freeze_backbone=True, probe_l2=[0.01, 1.0])
    train = separable_pairs(PROMPTS[:9]) + separable_pairs(PROMPTS[:9], offset=2)
    val = separable_pairs(PROMPTS[9:], offset=1)
    threads = torch.get_num_threads()
    report = train_reward_model(tiny_model_dir, train, val, params, tmp_path / "model", tmp_path / "live")
    torch.set_num_threads(threads)
    assert report["probe"]["l2"] in (0.01, 1.0) and set(report["probe"]["cv_accuracy"]) == {"0.01", "1.0"}

    model, tokenizer = load_reward_model(tmp_path / "model")
    conversations = [p["prompt"] + p["chosen"] for p in val] + [p["prompt"] + p["rejected"] for p in val]
    features = pooled_features(model, tokenizer, conversations, 64, batch_size=3)  # batches of mixed lengths
    expected = (features @ model.score.weight[0].detach()).tolist()
    assert score_conversations(model, tokenizer, conversations, batch_size=5, max_length=64) == pytest.approx(
        expected, abs=1e-4)
