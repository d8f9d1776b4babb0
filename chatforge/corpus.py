"""The plain texts of a split of the clean data: conversations (turn contents joined by newlines), then
documents. The tokenizer, pretraining, the n-gram baseline and evaluation all read text through here, so
they see the same texts in the same order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from chatforge.conversation import conversation_text, stable_hash
from chatforge.errors import ChatforgeError
from chatforge.files import iter_jsonl

CLEAN_DIR = Path("data/clean")
SPLITS = ("train", "val", "test")


def split_files(split: str, root: str | Path = CLEAN_DIR) -> tuple[Path, Path]:
    """(conversations, documents) files of `split`, as the clean stage writes them."""
    if split not in SPLITS:
        raise ChatforgeError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = Path(root)
    return root / f"{split}.jsonl", root / f"documents_{split}.jsonl"


def iter_texts(split: str, root: str | Path = CLEAN_DIR) -> Iterator[str]:
    """Every non-empty text of `split`: each conversation, then each document."""
    conversations, documents = split_files(split, root)
    for path in (conversations, documents):
        if not path.exists():
            raise ChatforgeError(f"{path}: not found; run `dvc repro clean` first")
    yield from texts_of((record for _, record in iter_jsonl(conversations)),
                        (record for _, record in iter_jsonl(documents)))


def texts_of(conversations: Iterable[dict], documents: Iterable[dict]) -> Iterator[str]:
    for record in conversations:
        text = conversation_text(record)
        if text:
            yield text
    for record in documents:
        if record.get("text"):
            yield record["text"]


def fixed_sample(records: list[dict], limit: int | None) -> list[dict]:
    """At most `limit` records, the same ones whatever the order or the model: those with the smallest stable
    hash of their id, kept in file order. None keeps all."""
    if limit is None or len(records) <= limit:
        return records
    chosen = set(sorted(range(len(records)), key=lambda i: stable_hash(str(records[i].get("id"))))[:limit])
    return [record for i, record in enumerate(records) if i in chosen]


def read_texts(split: str, root: str | Path = CLEAN_DIR) -> list[str]:
    return list(iter_texts(split, root))


def utf8_bytes(texts: list[str]) -> int:
    return sum(len(text.encode("utf-8")) for text in texts)


class ByteCappedTexts:
    """The texts in order until the next one would pass `max_bytes` of UTF-8 in all (None: every text); counts
    what it yielded in `texts` and `bytes`. Iterated once, it holds one text at a time."""

    def __init__(self, texts: Iterable[str], max_bytes: int | None):
        self.source, self.max_bytes = texts, max_bytes
        self.texts = self.bytes = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.source:
            size = len(text.encode("utf-8"))
            if self.max_bytes is not None and self.bytes + size > self.max_bytes:
                return
            self.texts, self.bytes = self.texts + 1, self.bytes + size
            yield text
