"""SFT: the assistant-only loss mask, context fitting, a short real run of the stage, the saved model."""
from __future__ import annotations

import json
import math

import torch
import yaml

from conftest import TINY_TEXTS, make_tiny_llama

from chatforge.chat_format import END_OF_TURN
from chatforge.conversation import alternate, conversation
from chatforge.lm_loss import assistant_loss
from chatforge.tokenization import end_of_turn_id
from chatforge.chat_windows import IGNORE_INDEX, fit_conversation, render

MULTI_TURN = [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "Hello! How are you today?"},
    {"role": "assistant", "content": "I am fine, thank you. And you?"},
    {"role": "user", "content": "What is your favorite food?"},
    {"role": "assistant", "content": "I like pizza and pasta, café ü."},
]


def assistant_char_spans(text: str, turns: list[dict]) -> list[tuple[int, int]]:
    """Character spans of each assistant content + its <|end|> in the rendered text."""
    spans, cursor = [], 0
    for turn in turns:
        start = text.index(turn["content"], cursor)
        cursor = start + len(turn["content"])
        if turn["role"] == "assistant":
            assert text[cursor:cursor + len(END_OF_TURN)] == END_OF_TURN
            spans.append((start, cursor + len(END_OF_TURN)))
    return spans


def test_loss_mask_is_exactly_the_assistant_text(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    encoded = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_char_spans(text, MULTI_TURN)
    expected = [any(a <= start and end <= b for a, b in spans) for start, end in encoded["offset_mapping"]]

    windows, stats = fit_conversation(tiny_tokenizer, MULTI_TURN, max_length=512)

    assert len(windows) == 1 and windows[0]["input_ids"] == encoded["input_ids"]
    labelled = [label != IGNORE_INDEX for label in windows[0]["labels"]]
    assert labelled == expected
    assert sum(expected) == stats.assistant_tokens == stats.assistant_tokens_trained
    decoded = tiny_tokenizer.decode([t for t, keep in zip(encoded["input_ids"], labelled) if keep])
    assert decoded == "".join(t["content"] + END_OF_TURN for t in MULTI_TURN if t["role"] == "assistant")

    model = make_tiny_llama(tiny_tokenizer)
    result = assistant_loss(model, tiny_tokenizer, windows)
    assert result.tokens == sum(expected)
    assert result.bytes == sum(len(t["content"].encode("utf-8")) for t in MULTI_TURN if t["role"] == "assistant")
    assert 0 < result.loss < 2 * math.log(len(tiny_tokenizer))


def test_trl_collator_labels_are_ignored_exactly_outside_assistant_tokens(tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    conversations = [MULTI_TURN, MULTI_TURN[1:3], MULTI_TURN[:3]]
    windows = [fit_conversation(tiny_tokenizer, turns, max_length=512)[0][0] for turns in conversations]
    config = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_length=None,
                       per_device_train_batch_size=len(windows), activation_checkpointing=False)
    trainer = SFTTrainer(model=make_tiny_llama(tiny_tokenizer), args=config, train_dataset=Dataset.from_list(windows),
                         processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))

    by_ids = {tuple(w["input_ids"]): w for w in windows}
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        length = int(attention.sum())
        window = by_ids[tuple(ids[:length].tolist())]  # the sampler shuffles rows
        assert labels[:length].tolist() == window["labels"]
        assert (labels[length:] == IGNORE_INDEX).all() and (ids[length:] == tiny_tokenizer.pad_token_id).all()
        mask = render(tiny_tokenizer, conversations[windows.index(window)]).mask
        assert ((labels[:length] != IGNORE_INDEX).tolist()) == [bool(m) for m in mask]


def test_context_fitting_counts_kept_and_cut_assistant_tokens(tiny_tokenizer):
    long_reply = " ".join(["Computers run programs written by people."] * 12)
    turns = alternate(TINY_TEXTS[:6]) + [{"role": "user", "content": "Tell me more."},
                                         {"role": "assistant", "content": long_reply}] + alternate(TINY_TEXTS[6:10])
    rendered = render(tiny_tokenizer, turns)
    ids, mask = rendered.ids, rendered.mask
    max_length = 48
    # Each assistant turn alone, without <|bos|>: <|assistant|> content <|end|>; a window holds at most
    # <|bos|><|assistant|> + max_length - 2 of its trained tokens.
    alone = [render(tiny_tokenizer, [t]).ids[1:] for t in turns if t["role"] == "assistant"]
    expected_cut = sum(max(0, len(tokens) - 1 - (max_length - 2)) for tokens in alone)
    assert expected_cut > 0 and len(ids) > 3 * max_length

    windows, stats = fit_conversation(tiny_tokenizer, turns, max_length)

    assert stats.assistant_tokens == sum(mask)
    assert stats.assistant_tokens_cut == expected_cut
    assert stats.assistant_tokens_trained + stats.assistant_tokens_cut == sum(mask)
    assert stats.windows == len(windows) > 3
    labelled = [t for w in windows for t, label in zip(w["input_ids"], w["labels"]) if label != IGNORE_INDEX]
    assert len(labelled) == stats.assistant_tokens_trained
    for window in windows:
        assert len(window["input_ids"]) <= max_length and window["input_ids"][0] == tiny_tokenizer.bos_token_id
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(window["input_ids"], window["labels"]))
    # Every assistant turn is trained on exactly once, in order: whole, or an over-long one's head.
    assert labelled == [token for tokens in alone for token in tokens[1:max_length - 1]]
    # Windows whose context was shortened to fit start mid-turn; all others start at a role token.
    mid_turn = [not tiny_tokenizer.convert_ids_to_tokens(w["input_ids"][1]).startswith("<|") for w in windows]
    assert sum(mid_turn) == stats.windows_with_cut_context > 0


def test_later_windows_carry_earlier_turns_as_unlabelled_history(tiny_tokenizer):
    turns = alternate(TINY_TEXTS[:8])
    alone = [render(tiny_tokenizer, [t]).ids[1:] for t in turns]
    max_length = 1 + sum(len(a) for a in alone[1:4])  # turns 1-3 fit, turns 0-3 do not
    assert 1 + sum(len(a) for a in alone[2:6]) > max_length

    windows, stats = fit_conversation(tiny_tokenizer, turns, max_length)

    assert stats.assistant_tokens_cut == 0 and stats.windows_with_cut_context == 0
    first, second = windows[:2]
    assert first["input_ids"] == [tiny_tokenizer.bos_token_id, *alone[0], *alone[1]]
    # The second window trains on turns 2-3 and re-reads turn 1 (already trained) as context only.
    assert second["input_ids"] == [tiny_tokenizer.bos_token_id, *alone[1], *alone[2], *alone[3]]
    history = 1 + len(alone[1]) + len(alone[2]) + 1  # … and <|assistant|> of turn 3
    assert all(label == IGNORE_INDEX for label in second["labels"][:history])
    assert second["labels"][history:] == alone[3][1:]


def test_special_token_text_in_a_turn_is_skipped_and_counted(tiny_tokenizer):
    from chatforge.files import SkipLog
    from chatforge.chat_windows import fit_conversations

    records = [conversation("a", "t", MULTI_TURN[1:3]),
               conversation("b", "t", [{"role": "user", "content": "hi<|end|><|assistant|>x"},
                                       {"role": "assistant", "content": "ok"}])]
    windows, stats = fit_conversations(tiny_tokenizer, records, 64, SkipLog())
    assert stats.conversations == 1 and len(windows) == 1
    assert stats.skipped["by_reason"] == {"special_token_text": 1}


def test_sft_stage_lowers_val_assistant_loss_and_saves_a_chat_model(tiny_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from chatforge.files import write_jsonl

    make_tiny_llama(tiny_tokenizer, hidden=48, context=64).save_pretrained(tmp_path / "models/base")
    tiny_tokenizer.save_pretrained(tmp_path / "models/base")
    pairs = list(zip(TINY_TEXTS[:6], TINY_TEXTS[1:7]))
    records = [conversation(f"c{i}", "t", alternate([*pairs[i % 6], *pairs[(i + 1) % 6]])) for i in range(48)]
    write_jsonl(tmp_path / "data/clean/train.jsonl", records[:40])
    write_jsonl(tmp_path / "data/clean/val.jsonl", records[40:])
    params = {"sft": {"max_steps": 30, "learning_rate": 0.005, "batch_size": 8, "eval_steps": 10,
                      "logging_steps": 5, "precision": "fp32", "threads": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)

    import stages.sft

    stages.sft.main()

    report = json.loads((tmp_path / "reports/sft.json").read_text())
    assert report["val_after"]["loss"] < report["val_before"]["loss"] - 0.5
    assert report["val_after"]["tokens"] == report["val_before"]["tokens"] > 0
    assert report["steps"] == 30 and report["assistant_tokens_cut"] == 0
    assert report["assistant_tokens_trained"] == report["train"]["assistant_tokens"] > 0
    val_curve = (tmp_path / "reports/live/sft/plots/metrics/val/loss.tsv").read_text().split()
    assert val_curve[:2] == ["step", "loss"] and val_curve[2::2] == ["0", "10", "20", "30"]

    saved = tmp_path / "models/sft"
    model = AutoModelForCausalLM.from_pretrained(saved, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    generation = GenerationConfig.from_pretrained(saved)
    assert end_of_turn_id(tokenizer) in generation.eos_token_id
    assert generation.pad_token_id == tokenizer.pad_token_id != end_of_turn_id(tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompt).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_sft_with_lora_saves_a_merged_model_that_plain_transformers_loads(tiny_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from stage_projects import saved_tensors, sft_project

    sft_project(tmp_path, tiny_tokenizer, max_steps=20, learning_rate=0.01,
                lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    monkeypatch.chdir(tmp_path)
    import stages.sft

    stages.sft.main()

    report = json.loads((tmp_path / "reports/sft.json").read_text())
    assert report["val_after"]["loss"] < report["val_before"]["loss"]
    base, tuned = saved_tensors(tmp_path / "models/base"), saved_tensors(tmp_path / "models/sft")
    assert tuned.keys() == base.keys()  # no lora_A/lora_B/base_layer: the adapters are merged
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert changed == {f"model.layers.{i}.{module}.weight" for i in range(2)
                       for module in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "models/sft", use_safetensors=True)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_bad_lora_params_are_one_line_naming_the_key(tiny_tokenizer, tmp_path):
    import pytest

    from chatforge.errors import ChatforgeError
    from chatforge.params import from_dict
    from chatforge.training.lora import LoraParams, add_adapters
    from chatforge.training.sft import SFTParams

    assert from_dict(SFTParams, {"lora": None}, "sft").lora is None
    assert from_dict(SFTParams, {"lora": {"r": 4}}, "sft").lora == LoraParams(r=4)
    with pytest.raises(ChatforgeError, match=r"sft\.lora\.r must be >= 1"):
        from_dict(SFTParams, {"lora": {"r": 0}}, "sft")
    with pytest.raises(ChatforgeError, match=r"unknown key sft\.lora\.rank"):
        from_dict(SFTParams, {"lora": {"rank": 4}}, "sft")
    with pytest.raises(ChatforgeError, match=r"sft\.lora\.target_modules=\['qkv'\]: .*q_proj"):
        add_adapters(make_tiny_llama(tiny_tokenizer), LoraParams(target_modules=["qkv"]), "sft.lora", "CAUSAL_LM")
