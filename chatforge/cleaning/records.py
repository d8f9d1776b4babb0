"""Our records as datatrove Documents and back.

A Document's text is what language detection reads (a conversation's turns joined by newlines, a
document's text, a preference's prompt); its metadata holds the record as read (`input`, for
dropped.jsonl), the cleaned record (`record`), the kind, where it was read (file:line) and `order`, its
position in the input: kind, then shard, then line. Dedup keeps the first record in that order, so
results never depend on how records were spread over tasks.
"""
from __future__ import annotations

import numpy as np
from datatrove.data import Document

from chatforge.conversation import conversation_text

KINDS = ("conversation", "document", "preference")
_SHARD_BITS, _LINE_BITS = 24, 32


def order_key(kind: str, shard: int, line: int) -> int:
    """One integer that sorts like (kind, shard, line)."""
    return (KINDS.index(kind) << (_SHARD_BITS + _LINE_BITS)) | (shard << _LINE_BITS) | line


def kind_of_order(order: int) -> str:
    return KINDS[order >> (_SHARD_BITS + _LINE_BITS)]


def kind_indices(orders: np.ndarray) -> np.ndarray:
    """KINDS.index of each order in a uint64 array (kind_of_order, vectorized)."""
    return orders >> np.uint64(_SHARD_BITS + _LINE_BITS)


def record_text(kind: str, record: dict) -> str:
    if kind == "conversation":
        return conversation_text(record)
    if kind == "document":
        return record["text"]
    return "\n".join(t["content"] for t in record["prompt"])


def to_document(kind: str, where: str, order: int, record: dict) -> Document:
    # the text is filled in by the structure step, once the record is known to have the fields it reads
    return Document(text="", id=where, metadata={"kind": kind, "where": where, "order": order,
                                                 "input": record, "record": record})


def set_record(doc: Document, record: dict) -> None:
    """The cleaned record replaces the previous one; the text follows it."""
    doc.metadata["record"] = record
    doc.text = record_text(doc.metadata["kind"], record)


def shard_row(writer, doc: Document) -> dict:
    """JsonlWriter's adapter for the engine's working shards: the metadata is the whole state."""
    return doc.metadata


def dedup_texts(doc: Document) -> list[str]:
    """The texts near-dedup shingles: each turn of a conversation (word n-grams never cross turns)."""
    record = doc.metadata["record"]
    return [t["content"] for t in record["turns"]] if doc.metadata["kind"] == "conversation" else [record["text"]]
