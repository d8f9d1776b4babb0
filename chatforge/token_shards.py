"""Token shards: each split's texts tokenized once, packed, and stored as raw numpy arrays on disk.

`data/tokens/{train,val}/part-NNNNN.bin` hold one stream per split, `eos r1 eos r2 ... eos rN eos` (the packing
of `training.pretrain.pack`), cut into parts of at most `tokenize.tokens_per_shard` tokens, as uint16 when every
id fits (vocabularies up to 65,536) else uint32. `data/tokens/manifest.json` names the dtype, vocabulary size,
eos id, a hash of the tokenizer.json they came from, and per split the texts, tokens, UTF-8 bytes of text and
the parts (file, tokens, sha256). The stream is written batch by batch and read back through memmaps, so
memory never grows with the corpus; pretraining reads these instead of tokenizing (docs/pretraining.md).
"""
from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from chatforge.console import progress
from chatforge.corpus import CLEAN_DIR, iter_texts
from chatforge.errors import ChatforgeError
from chatforge.files import atomic_path, file_sha256
from chatforge.params import require

STAGE = "tokenize"
TOKENS_DIR = Path("data/tokens")
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


@dataclass
class TokenizeConfig:
    """params.yaml section `tokenize`."""

    tokens_per_shard: int = 100_000_000  # 200 MB a part as uint16
    batch_texts: int = 1024              # texts per tokenizer call: what memory holds at once

    def validate(self, section: str) -> None:
        require(self.tokens_per_shard >= 1, f"{section}.tokens_per_shard", "must be at least 1")
        require(self.batch_texts >= 1, f"{section}.batch_texts", "must be at least 1")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardWriter:
    """Appends tokens to `folder/part-NNNNN.bin`, starting a new part every `tokens_per_shard` tokens."""

    def __init__(self, folder: Path, dtype: np.dtype, tokens_per_shard: int):
        self.folder, self.dtype, self.tokens_per_shard = folder, dtype, tokens_per_shard
        self.parts: list[dict] = []
        self._handle, self._digest, self._count = None, None, 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._handle is None or self._count == self.tokens_per_shard:
                self._next_part()
            piece = tokens[:self.tokens_per_shard - self._count]
            data = piece.tobytes()
            self._handle.write(data)
            self._digest.update(data)
            self._count += len(piece)
            tokens = tokens[len(piece):]

    def _next_part(self) -> None:
        self._close_part()
        name = f"part-{len(self.parts):05d}.bin"
        self._handle, self._digest, self._count = open(self.folder / name, "wb"), hashlib.sha256(), 0
        self.parts.append({"file": f"{self.folder.name}/{name}"})

    def _close_part(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self.parts[-1].update(tokens=self._count, sha256=self._digest.hexdigest())
            self._handle = None

    def close(self) -> list[dict]:
        self._close_part()
        return self.parts


def write_split(texts: Iterable[str], tokenizer, writer: ShardWriter, batch_texts: int, on_batch=None) -> dict:
    """Tokenize `texts` batch by batch into `writer` as `eos r1 eos r2 ... eos`; returns the split's counts.
    `on_batch(texts in the batch, tokens so far)` follows the progress."""
    eos = tokenizer.eos_token_id
    counts = {"texts": 0, "tokens": 0, "bytes": 0}
    for batch in batched(texts, batch_texts):
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        packed = np.fromiter((token for record in ids for token in (eos, *record)), dtype=np.int64,
                             count=sum(len(record) + 1 for record in ids))
        writer.write(packed)
        counts["texts"] += len(batch)
        counts["tokens"] += len(packed)
        counts["bytes"] += sum(len(text.encode("utf-8")) for text in batch)
        if on_batch:
            on_batch(len(batch), counts["tokens"])
    writer.write(np.array([eos]))  # the last record's end (the whole stream of an empty split)
    counts["tokens"] += 1
    return {**counts, "shards": writer.close()}


def tokenize_corpus(tokenizer, tokenizer_json: Path, output: Path, config: TokenizeConfig,
                    clean_dir: Path = CLEAN_DIR) -> dict:
    """Write the train and val token shards and the manifest into `output`, atomically; returns the manifest."""
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    manifest = {
        "format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size, "eos_id": tokenizer.eos_token_id,
        "tokenizer_sha256": file_sha256(tokenizer_json), "tokens_per_shard": config.tokens_per_shard, "splits": {},
    }
    with atomic_path(output, is_dir=True) as tmp, progress() as bar:
        for split in SPLITS:
            task = bar.add_task(f"{STAGE} {split} texts", total=None, info="")
            writer = ShardWriter(Path(tmp) / split, dtype, config.tokens_per_shard)
            manifest["splits"][split] = write_split(
                iter_texts(split, clean_dir), tokenizer, writer, config.batch_texts,
                lambda texts, tokens: bar.update(task, advance=texts, info=f"{tokens:,} tokens"))
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(root: Path = TOKENS_DIR) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise ChatforgeError(f"{path}: not found; run `dvc repro tokenize` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ChatforgeError(f"{path}: not valid JSON ({error}); run `dvc repro tokenize` again") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ChatforgeError(f"{path}: format {manifest.get('format')}, expected {FORMAT_VERSION}; "
                             f"run `dvc repro tokenize` again")
    return manifest


def check_tokenizer(manifest: dict, tokenizer_json: Path, root: Path = TOKENS_DIR) -> None:
    """The shards must come from the tokenizer the model is built with."""
    if manifest["tokenizer_sha256"] != file_sha256(tokenizer_json):
        raise ChatforgeError(f"{Path(root) / MANIFEST}: made with another tokenizer than {tokenizer_json}; "
                             f"run `dvc repro tokenize`")


def open_part(path: Path, dtype: np.dtype, tokens: int) -> np.memmap:
    size = path.stat().st_size if path.exists() else None
    if size != tokens * dtype.itemsize:
        found = "is missing" if size is None else f"has {size:,} bytes"
        raise ChatforgeError(f"{path}: {found}, the manifest says {tokens:,} {dtype.name} tokens; "
                             f"run `dvc repro tokenize` again")
    return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))


class TokenStream:
    """One split's stream as a 1-D sequence over its memmapped parts: `len` and slices, as int64 torch tensors like
    the packed tensor it replaces (PackedWindows and evaluation_batches only slice). Slices may cross parts; nothing
    is read until sliced."""

    def __init__(self, root: Path, manifest: dict, split: str):
        dtype = np.dtype(manifest["dtype"])
        self.parts = [open_part(Path(root) / part["file"], dtype, part["tokens"])
                      for part in manifest["splits"][split]["shards"]]
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))
        self.eos_id = manifest["eos_id"]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: slice) -> torch.Tensor:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("a TokenStream slice takes step 1 only")
        return torch.from_numpy(self._read(start, max(start, stop)))

    def _read(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        part = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            offset = start - self.starts[part]
            take = min(stop, self.starts[part + 1]) - start
            pieces.append(self.parts[part][offset:offset + take])
            start += take
            part += 1
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)

    def records(self, chunk: int = 1 << 20) -> Iterator[list[int]]:
        """The token lists of the records: the pieces between consecutive eos, read `chunk` tokens at a time.
        (A text holding the eos token's literal string would split in two here; training sees the same stream.)"""
        record: list[int] = []
        for start in range(1, len(self), chunk):  # position 0 is the stream's leading eos
            tokens = self._read(start, min(start + chunk, len(self)))
            ends = np.flatnonzero(tokens == self.eos_id)
            begin = 0
            for end in ends:
                record.extend(tokens[begin:end].tolist())
                yield record
                record, begin = [], end + 1
            record.extend(tokens[begin:].tolist())


def open_splits(root: Path = TOKENS_DIR) -> tuple[dict, TokenStream, TokenStream]:
    """(manifest, train stream, val stream) of the token shards in `root`."""
    manifest = read_manifest(root)
    return manifest, TokenStream(root, manifest, "train"), TokenStream(root, manifest, "val")
