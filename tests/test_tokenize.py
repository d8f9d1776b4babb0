"""Token shards: the stream read back equals today's packing, parts of bounded size with uint16/uint32 ids,
windows across parts, the manifest, atomic output, and the tokenize stage end to end."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

from chatforge.corpus import read_texts, utf8_bytes
from chatforge.errors import ChatforgeError
from chatforge.token_shards import (
    ShardWriter, TokenizeConfig, TokenStream, check_tokenizer, open_splits, token_dtype, tokenize_corpus,
)
from chatforge.lm_loss import evaluation_batches, pack
from chatforge.training.pretrain import PackedWindows

TEXTS = ["Hello! How are you today?", "I am fine, thank you. And you?", "ünïcödé 🙂 and café",
         "What is your favorite food?", "I like pizza and pasta.", "x"]


def write_clean(root, train_count=25, val_count=4):
    clean = root / "data" / "clean"
    clean.mkdir(parents=True)
    for split, count in (("train", train_count), ("val", val_count)):
        with open(clean / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for i in range(count):
                turns = [{"role": "user", "content": TEXTS[i % 6]},
                         {"role": "assistant", "content": TEXTS[(i + 1) % 6]}]
                handle.write(json.dumps({"id": f"{split}:{i}", "source": "t", "turns": turns, "meta": {}}) + "\n")
        with open(clean / f"documents_{split}.jsonl", "w", encoding="utf-8") as handle:
            for i in range(2):
                handle.write(json.dumps({"id": f"d{split}{i}", "source": "t", "text": f"A document {i}. " * 5}) + "\n")
    return clean


def tokenize(root, tokenizer, **config):
    tokenizer.save_pretrained(root / "models" / "tokenizer")
    return tokenize_corpus(tokenizer, root / "models" / "tokenizer" / "tokenizer.json", root / "data" / "tokens",
                           TokenizeConfig(**config), clean_dir=root / "data" / "clean")


def todays_stream(tokenizer, clean, split):
    ids = tokenizer(read_texts(split, clean), add_special_tokens=False)["input_ids"]
    return ids, pack(ids, tokenizer.eos_token_id)


def test_shards_read_back_as_todays_packed_stream_and_records(tmp_path, tiny_tokenizer):
    clean = write_clean(tmp_path)
    tokenize(tmp_path, tiny_tokenizer, tokens_per_shard=37, batch_texts=4)
    manifest, *streams = open_splits(tmp_path / "data" / "tokens")
    for split, stream in zip(("train", "val"), streams):
        ids, packed = todays_stream(tiny_tokenizer, clean, split)
        assert torch.equal(stream[0:len(stream)], packed) and stream[:].dtype == torch.long
        assert list(stream.records(chunk=10)) == ids  # the n-gram baseline's records, read in small chunks
        counts = manifest["splits"][split]
        texts = read_texts(split, clean)
        assert (counts["texts"], counts["tokens"], counts["bytes"]) == (len(texts), len(packed), utf8_bytes(texts))


def test_manifest_names_dtype_tokenizer_and_bounded_parts(tmp_path, tiny_tokenizer):
    write_clean(tmp_path)
    manifest = tokenize(tmp_path, tiny_tokenizer, tokens_per_shard=37)
    root = tmp_path / "data" / "tokens"
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert (manifest["dtype"], manifest["vocab_size"], manifest["eos_id"]) == (
        "uint16", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    tokenizer_json = (tmp_path / "models" / "tokenizer" / "tokenizer.json").read_bytes()
    assert manifest["tokenizer_sha256"] == hashlib.sha256(tokenizer_json).hexdigest()
    parts = manifest["splits"]["train"]["shards"]
    assert len(parts) > 2 and [p["file"] for p in parts] == [f"train/part-{i:05d}.bin" for i in range(len(parts))]
    assert all(p["tokens"] == 37 for p in parts[:-1]) and 1 <= parts[-1]["tokens"] <= 37
    assert sum(p["tokens"] for p in parts) == manifest["splits"]["train"]["tokens"]
    for part in parts:
        data = (root / part["file"]).read_bytes()
        assert len(data) == 2 * part["tokens"] and hashlib.sha256(data).hexdigest() == part["sha256"]
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "train", "val"]


def test_an_empty_split_is_one_eos(tmp_path, tiny_tokenizer):
    write_clean(tmp_path, val_count=0)
    (tmp_path / "data" / "clean" / "documents_val.jsonl").write_text("")
    manifest = tokenize(tmp_path, tiny_tokenizer)
    _, _, val = open_splits(tmp_path / "data" / "tokens")
    assert val[:].tolist() == [tiny_tokenizer.eos_token_id] and list(val.records()) == []
    assert manifest["splits"]["val"]["texts"] == 0


def test_ids_are_uint16_while_the_vocabulary_fits_else_uint32(tmp_path):
    assert token_dtype(300) == token_dtype(49153) == token_dtype(2**16) == np.uint16  # SmolLM2's 49,153 fits
    assert token_dtype(2**16 + 1) == np.uint32
    ids = np.array([0, 70_000, 5, 2**32 - 1, 0, 123_456, 0])  # above uint16, eos 0
    parts = ShardWriter(tmp_path / "train", np.dtype(np.uint32), tokens_per_shard=3)
    parts.write(ids[:2])
    parts.write(ids[2:])
    manifest = {"dtype": "uint32", "eos_id": 0, "splits": {"train": {"shards": parts.close()}}}
    assert [p["tokens"] for p in manifest["splits"]["train"]["shards"]] == [3, 3, 1]
    stream = TokenStream(tmp_path, manifest, "train")
    assert stream[:].tolist() == ids.tolist()
    assert list(stream.records()) == [[70_000, 5, 2**32 - 1], [123_456]]


def test_windows_across_parts_are_the_same_tokens(tmp_path):
    ids = (np.arange(1, 200) * 7) % 251
    writer = ShardWriter(tmp_path / "train", np.dtype(np.uint16), tokens_per_shard=5)
    writer.write(ids)
    stream = TokenStream(tmp_path, {"dtype": "uint16", "eos_id": 0, "splits": {"train": {"shards": writer.close()}}},
                         "train")
    tensor = torch.from_numpy(ids.astype(np.int64))
    assert len(stream) == len(tensor)
    for start, stop in [(0, 5), (3, 12), (4, 6), (0, 199), (190, 250), (7, 7), (-9, -1)]:
        assert torch.equal(stream[start:stop], tensor[start:stop])
    on_disk, in_memory = PackedWindows(stream, 8, seed=1), PackedWindows(tensor, 8, seed=1)
    for positions in (range(0, 16), range(20, 60)):  # the second epoch starts at a random offset
        assert all(torch.equal(a, b) for a, b in zip(on_disk.batch(positions), in_memory.batch(positions)))
    for (x1, y1), (x2, y2) in zip(evaluation_batches(stream, 8, 4), evaluation_batches(tensor, 8, 4), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_failing_run_leaves_no_output_and_keeps_the_previous_one(tmp_path, tiny_tokenizer):
    clean = write_clean(tmp_path)
    with open(clean / "val.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")  # val is read after train's parts are written
    with pytest.raises(ChatforgeError, match=r"val.jsonl:5: bad_json"):
        tokenize(tmp_path, tiny_tokenizer, tokens_per_shard=37)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["clean"]  # no data/tokens, no temp folder

    (clean.parent / "tokens").mkdir()
    (clean.parent / "tokens" / "manifest.json").write_text("previous")
    with pytest.raises(ChatforgeError):
        tokenize(tmp_path, tiny_tokenizer)
    assert (clean.parent / "tokens" / "manifest.json").read_text() == "previous"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["clean", "tokens"]


def test_shards_of_another_tokenizer_are_one_clear_error(tmp_path, tiny_tokenizer):
    write_clean(tmp_path)
    manifest = tokenize(tmp_path, tiny_tokenizer)
    other = tmp_path / "other.json"
    other.write_text("{}")
    with pytest.raises(ChatforgeError, match=r"data/tokens/manifest.json: made with another tokenizer .*"
                                             r"run `dvc repro tokenize`"):
        check_tokenizer(manifest, other, tmp_path / "data" / "tokens")
    check_tokenizer(manifest, tmp_path / "models" / "tokenizer" / "tokenizer.json")


def test_tokenize_stage_writes_shards_and_report(tmp_path, monkeypatch, tiny_tokenizer):
    from stages import tokenize_corpus as stage

    write_clean(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path / "models" / "tokenizer")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tokenize": {"tokens_per_shard": 100}}))
    monkeypatch.chdir(tmp_path)
    stage.main()
    report = json.loads((tmp_path / "reports" / "tokenize.json").read_text())
    manifest = json.loads((tmp_path / "data" / "tokens" / "manifest.json").read_text())
    for split in ("train", "val"):
        counts = manifest["splits"][split]
        assert report[split] == {"texts": counts["texts"], "tokens": counts["tokens"], "bytes": counts["bytes"],
                                 "shards": len(counts["shards"])}
    assert report["train"]["shards"] > 1 and report["dtype"] == "uint16" and report["wall_seconds"] >= 0

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tokenize": {"tokens_per_shard": 0}}))
    with pytest.raises(SystemExit):
        stage.main()


def test_a_missing_or_truncated_part_is_one_clear_error(tmp_path, tiny_tokenizer):
    write_clean(tmp_path)
    manifest = tokenize(tmp_path, tiny_tokenizer, tokens_per_shard=37)
    root = tmp_path / "data" / "tokens"
    part = root / manifest["splits"]["train"]["shards"][1]["file"]
    part.write_bytes(part.read_bytes()[:-2])
    with pytest.raises(ChatforgeError, match=r"part-00001.bin: has 72 bytes, the manifest says 37 uint16 tokens"):
        open_splits(root)
    part.unlink()
    with pytest.raises(ChatforgeError, match=r"part-00001.bin: is missing"):
        open_splits(root)
