"""dpo: trl's DPOTrainer from a tiny SFT model against itself; implicit rewards, held-out drift, LoRA, fitting."""
from __future__ import annotations

import json

import pytest
import torch

from chatforge.conversation import conversation, preference
from chatforge.params import from_dict
from chatforge.training.dpo import DPOParams, completion_logps, fit_pairs, implicit_rewards, train_dpo
from chatforge.runtime import autocast
from test_reward import PROMPTS, separable_pairs

HELDOUT = [conversation(f"c{i}", "test", [{"role": "user", "content": text}, {"role": "assistant", "content": "Ok."}])
           for i, text in enumerate(PROMPTS)]


def params(**overrides) -> DPOParams:
    base = {"epochs": 6, "batch_size": 6, "learning_rate": 3e-3, "warmup_steps": 0.0, "logging_steps": 2,
            "eval_steps": 4, "heldout_prompts": 4, "max_new_tokens": 8, "eval_batch_size": 4,
            "threads": 1}  # tiny model: a second thread only adds synchronization
    return from_dict(DPOParams, {**base, **overrides}, "dpo")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("dpo")
    train = separable_pairs(PROMPTS[:9]) + separable_pairs(PROMPTS[:9], offset=2)
    val = separable_pairs(PROMPTS[9:], offset=1)
    threads = torch.get_num_threads()
    report = train_dpo(tiny_model_dir, train, val, HELDOUT, params(), out / "model", out / "live")
    torch.set_num_threads(threads)
    return out, report


def test_dpo_prefers_chosen_on_held_out_pairs_and_moves_from_sft(trained):
    out, report = trained
    assert report["accuracy"] == 1.0 and report["mean_margin"] > 0
    assert report["accuracy_by_origin"] == {"synthetic": 1.0}
    assert report["chosen_reward_mean"] > report["rejected_reward_mean"]
    assert report["kl_to_sft"] > 0 and report["heldout_prompts"] == 4 and len(report["examples"]) == 3
    assert report["train_pairs"] == {"pairs": 18, "prompts_shortened": 0, "skipped_prompt_too_long": 0}
    assert report["steps"] == 18 and report["replies_cut"] == {"train": 0, "val": 0}
    summary = json.loads((out / "live/metrics.json").read_text())
    assert summary["step"] == report["steps"] and "accuracies" in summary["eval"]["rewards"]


def test_saved_model_loads_in_plain_transformers(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    assert list((out / "model").glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.generation_config.eos_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_implicit_rewards_are_zero_against_itself_and_ignore_padding(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    short = {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]}
    long = {"prompt_ids": [5, 6, 7, 8, 9, 10], "chosen_ids": [11, 12, 13], "rejected_ids": [14]}
    chosen, rejected = implicit_rewards(model, model, [short, long], tiny_tokenizer.pad_token_id, 64, 0.1, 2,
                                        autocast(torch.device("cpu"), None))
    assert chosen == [0.0, 0.0] and rejected == [0.0, 0.0]
    with torch.no_grad():
        alone = completion_logps(model, {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3),
                                         "completion_mask": torch.tensor([[0, 0, 1]])})
        logits = model(torch.tensor([[5, 6]])).logits[0, -1].log_softmax(-1)
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        padded = completion_logps(model, DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id)([short, long]))
    assert torch.allclose(alone[0], logits[7]) and torch.allclose(padded[0], alone[0], atol=1e-5)


def test_prompts_are_fitted_and_too_long_ones_counted(tiny_tokenizer):
    chat = [{"role": "user", "content": "Hello! How are you today?"}, {"role": "assistant", "content": "Fine."}]
    long_history = preference("a", "t", chat * 20 + [{"role": "user", "content": "And you?"}],
                              [{"role": "assistant", "content": "Good."}], [{"role": "assistant", "content": "No."}])
    too_long = preference("b", "t", [{"role": "user", "content": "word " * 200}],
                          [{"role": "assistant", "content": "Good."}], [{"role": "assistant", "content": "No."}])
    rows, kept, counts = fit_pairs([long_history, too_long], tiny_tokenizer, 48)
    assert counts == {"pairs": 2, "prompts_shortened": 1, "skipped_prompt_too_long": 1} and kept == [long_history]
    assert rows[0]["prompt"][-1] == {"role": "user", "content": "And you?"} and len(rows[0]["prompt"]) < 41


def test_lora_trains_adapters_and_saves_a_plain_merged_model(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    train = separable_pairs(PROMPTS[:9])
    report = train_dpo(tiny_model_dir, train, separable_pairs(PROMPTS[9:], offset=1), HELDOUT,
                       params(epochs=2, lora={"r": 4, "alpha": 8}), tmp_path / "model", tmp_path / "live")
    weights = load_file(next((tmp_path / "model").glob("*.safetensors")))
    assert not any("lora" in name for name in weights)
    original = load_file(next(tiny_model_dir.glob("*.safetensors")))
    assert any(not torch.equal(weights[name], original[name]) for name in original if "proj" in name)
    assert report["kl_to_sft"] != 0 and report["params"]["lora"]["r"] == 4


def test_bad_params_name_the_key():
    with pytest.raises(Exception, match="dpo.max_length"):
        params(max_length=64, max_prompt_tokens=64)
    with pytest.raises(Exception, match="dpo.loss_type"):
        params(loss_type="kto")
