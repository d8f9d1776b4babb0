"""The conversation, document and preference records that flow between stages (see DESIGN.md).

Conversation: {"id", "source", "turns": [{"role", "content"}], "meta"}
Document:     {"id", "source", "text", "meta"}
Preference:   {"id", "source", "prompt": [turns], "chosen": [turns], "rejected": [turns]}
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

from chatforge.files import SkipLog, iter_jsonl

ROLES = ("system", "user", "assistant")


class InvalidRecord(ValueError):
    """A record that breaks the schema; `reason` is a short counted name, the message a detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def alternate(texts: Iterable[str], first: str = "user") -> list[dict]:
    """Turns for a source without roles: user and assistant alternate, `first` first."""
    roles = ("user", "assistant") if first == "user" else ("assistant", "user")
    return [turn(roles[i % 2], text) for i, text in enumerate(texts)]


def conversation(id: str, source: str, turns: list[dict], meta: dict | None = None) -> dict:
    return {"id": id, "source": source, "turns": turns, "meta": meta or {}}


def document(id: str, source: str, text: str, meta: dict | None = None) -> dict:
    return {"id": id, "source": source, "text": text, "meta": meta or {}}


def preference(id: str, source: str, prompt: list[dict], chosen: list[dict], rejected: list[dict],
               meta: dict | None = None) -> dict:
    record = {"id": id, "source": source, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    if meta:
        record["meta"] = meta
    return record


def check_turns(turns: Any, field: str = "turns") -> list[dict]:
    """Validate a list of turns; raises InvalidRecord with a counted reason."""
    if not isinstance(turns, list) or not turns:
        raise InvalidRecord("no_turns", f"{field} must be a non-empty list")
    for index, item in enumerate(turns):
        if not isinstance(item, dict):
            raise InvalidRecord("bad_turn", f"{field}[{index}] is not an object")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise InvalidRecord("bad_role", f"{field}[{index}].role={role!r}, expected one of {ROLES}")
        if not isinstance(content, str):
            raise InvalidRecord("non_string_content", f"{field}[{index}].content is {type(content).__name__}")
    return turns


def check_conversation(record: Any) -> dict:
    """Structure check: valid id/source, valid roles, string contents, a user and an assistant turn."""
    if not isinstance(record, dict):
        raise InvalidRecord("not_an_object")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise InvalidRecord("missing_id")
    check_turns(record.get("turns"))
    roles = {t["role"] for t in record["turns"]}
    if "user" not in roles or "assistant" not in roles:
        raise InvalidRecord("missing_user_or_assistant", "needs at least one user and one assistant turn")
    if not isinstance(record.get("meta", {}), dict):
        raise InvalidRecord("bad_meta", "meta must be an object")
    return record


def check_document(record: Any) -> dict:
    if not isinstance(record, dict):
        raise InvalidRecord("not_an_object")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise InvalidRecord("missing_id")
    if not isinstance(record.get("text"), str):
        raise InvalidRecord("non_string_content", "text must be a string")
    if not record["text"].strip():
        raise InvalidRecord("empty_text")
    return record


def check_preference(record: Any) -> dict:
    """A preference pair: shared prompt, chosen and rejected replies that differ."""
    if not isinstance(record, dict):
        raise InvalidRecord("not_an_object")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise InvalidRecord("missing_id")
    check_turns(record.get("prompt"), "prompt")
    check_turns(record.get("chosen"), "chosen")
    check_turns(record.get("rejected"), "rejected")
    if record["chosen"] == record["rejected"]:
        raise InvalidRecord("chosen_equals_rejected")
    if record["prompt"][-1]["role"] != "user":
        raise InvalidRecord("prompt_not_ending_in_user", "the prompt must end with a user turn")
    return record


def stable_hash(text: str) -> int:
    """A hash that is the same on every machine and Python run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(key: str, fractions: dict[str, float]) -> str:
    """Assign a split by a stable hash of `key`, so adding records never moves existing ones."""
    point = (stable_hash(key) % 1_000_000) / 1_000_000
    cumulative = 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        if point < cumulative:
            return name
    return list(fractions)[-1]


def conversation_text(record: dict) -> str:
    """The text of a conversation: its turn contents joined by newlines (used by filters, langid, LM)."""
    return "\n".join(t["content"] for t in record["turns"])


def read_conversations(path: str | Path, skips: SkipLog) -> list[dict]:
    """Conversation records of a JSONL file; bad lines and invalid records are skipped, counted in `skips`."""
    records = []
    for lineno, record in iter_jsonl(path, skips):
        try:
            records.append(check_conversation(record))
        except InvalidRecord as error:
            skips.skip(error.reason, f"{path}:{lineno}", str(error))
    return records
