"""The tokenizer: lossless on odd text, special tokens as single ids, the chat template's assistant mask,
and the tokenizer stage end to end on a tiny project."""
from __future__ import annotations

import json

import pytest
import yaml

from chatforge.chat_format import END_OF_TURN, SPECIAL_TOKENS
from chatforge.corpus import ByteCappedTexts
from chatforge.tokenization import load_tokenizer, measure, train_tokenizer

ODD_TEXTS = [
    "  leading and trailing spaces  ",
    "tabs\tand\n\nnewlines\r\n and   runs     of spaces",
    "emoji 🙂👍🏽 and flags 🇫🇷 and a zero-width joiner 👩‍💻",
    "CJK 你好，世界 and kana こんにちは and Hangul 안녕하세요",
    "accents: café naïve Ångström résumé, combining e\u0301",
    "symbols ∑ ≤ ≥ → « » — ‘quotes’ and \\backslashes\\ and {braces}",
    "",
    " ",
]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_is_exact_on_odd_text(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_measure_reports_bytes_per_token_and_exact_round_trip(tiny_tokenizer):
    report = measure(tiny_tokenizer, ODD_TEXTS)
    assert report["roundtrip_exact"] == 1.0 and report["roundtrip_failures"] == 0
    assert report["bytes"] == sum(len(t.encode("utf-8")) for t in ODD_TEXTS)
    assert report["bytes_per_token"] == pytest.approx(report["bytes"] / report["tokens"], abs=1e-4)


def test_special_tokens_are_single_ids_and_pad_differs_from_eos(tiny_tokenizer):
    ids = [tiny_tokenizer(token, add_special_tokens=False)["input_ids"] for token in SPECIAL_TOKENS]
    assert all(len(token_ids) == 1 for token_ids in ids)
    assert len({token_ids[0] for token_ids in ids}) == len(SPECIAL_TOKENS)
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.pad_token_id == 0


def test_chat_template_masks_exactly_the_assistant_replies(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
    ]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    assert len(ids) == len(mask)
    trained = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == f"Hello!{END_OF_TURN}Fine, thanks.{END_OF_TURN}"
    assert tiny_tokenizer.decode(ids).startswith("<|bos|><|user|>Hi there<|end|><|assistant|>")


def write_clean(root, train, val):
    clean = root / "data" / "clean"
    clean.mkdir(parents=True)
    for split, texts in (("train", train), ("val", val), ("test", val)):
        with open(clean / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for i, text in enumerate(texts):
                turns = [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]}]
                handle.write(json.dumps({"id": f"{split}:{i}", "source": "t", "turns": turns, "meta": {}}) + "\n")
        (clean / f"documents_{split}.jsonl").write_text(
            json.dumps({"id": f"d{split}", "source": "t", "text": "a plain document, ünïcödé 🙂", "meta": {}}) + "\n",
            encoding="utf-8")


def test_tokenizer_stage_writes_tokenizer_and_report(tmp_path, monkeypatch):
    from stages import tokenizer as stage

    write_clean(tmp_path, ["Hello there, how are you?", "I like tea 🍵 and café."] * 30, ODD_TEXTS[:6])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tokenizer": {"vocab_size": 320, "min_frequency": 2}}))
    monkeypatch.chdir(tmp_path)
    stage.main()
    report = json.loads((tmp_path / "reports" / "tokenizer.json").read_text())
    assert report["val"]["roundtrip_exact"] == 1.0
    assert report["vocab_size"] <= 320 and report["val"]["bytes_per_token"] > 1
    tokenizer = load_tokenizer(tmp_path / "models" / "tokenizer")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|bos|><|user|>hi<|end|>"


def test_byte_capped_texts_stop_before_the_cap_and_count_what_they_gave():
    texts = ["abc", "dé", "fghij", "k"]  # 3, 3, 5, 1 bytes
    capped = ByteCappedTexts(iter(texts), max_bytes=7)
    assert list(capped) == ["abc", "dé"] and (capped.texts, capped.bytes) == (2, 6)
    everything = ByteCappedTexts(iter(texts), max_bytes=None)
    assert list(everything) == texts and (everything.texts, everything.bytes) == (4, 12)


def test_training_from_the_streamed_texts_gives_the_same_tokenizer_as_from_a_list():
    texts = ["Hello there, how are you?", "I like tea 🍵 and café."] * 30
    from_list = train_tokenizer(texts, 320)
    streamed = train_tokenizer(ByteCappedTexts(iter(texts), None), 320)
    assert streamed.backend_tokenizer.to_str() == from_list.backend_tokenizer.to_str()


def test_tokenizer_stage_sees_at_most_max_train_bytes(tmp_path, monkeypatch):
    from stages import tokenizer as stage

    seen = []

    def spy(texts, vocab_size, min_frequency):
        return train_tokenizer((seen.append(text) or text for text in texts), vocab_size, min_frequency)

    write_clean(tmp_path, ["Hello there, how are you?", "I like tea 🍵 and café."] * 30, ODD_TEXTS[:6])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tokenizer": {"vocab_size": 320, "max_train_bytes": 500}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage, "train_tokenizer", spy)
    stage.main()
    report = json.loads((tmp_path / "reports" / "tokenizer.json").read_text())
    seen_bytes = sum(len(text.encode("utf-8")) for text in seen)
    assert 0 < seen_bytes <= 500 and report["train_bytes"] == seen_bytes and report["train_texts"] == len(seen)
    assert report["train_texts"] < 61  # 60 conversations and a document without the cap

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tokenizer": {"vocab_size": 320, "max_train_bytes": 5}}))
    with pytest.raises(SystemExit):  # a cap below the first text is one error line
        stage.main()
