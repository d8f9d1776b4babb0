"""The plain texts of a split of the clean data: conversations (turn contents joined by newlines), then
documents. The tokenizer, pretraining, the n-gram baseline and evaluation all read text through here, so
they see the same texts in the same order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from chatforge.conversation import conversation_text
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
    for _, record in iter_jsonl(conversations):
        text = conversation_text(record)
        if text:
            yield text
    for _, record in iter_jsonl(documents):
        if record.get("text"):
            yield record["text"]


def read_texts(split: str, root: str | Path = CLEAN_DIR) -> list[str]:
    return list(iter_texts(split, root))


def utf8_bytes(texts: list[str]) -> int:
    return sum(len(text.encode("utf-8")) for text in texts)
