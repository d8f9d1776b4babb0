"""Shared helpers for the clean-stage tests: real dialogues from the installed chatterbot-corpus, items."""
from __future__ import annotations

from pathlib import Path

import yaml

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.pipeline import Item
from chatforge.conversation import alternate, conversation
from chatforge.params import from_dict
from chatforge.shards import ShardWriter


def chatterbot_dialogues(language: str = "english") -> list[list[str]]:
    """Every conversation of one language of the installed chatterbot-corpus, as lists of turn texts."""
    import chatterbot_corpus

    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    dialogues = []
    for path in sorted(folder.glob("*.yml")):
        for texts in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            if isinstance(texts, list) and len(texts) >= 2:
                dialogues.append([str(text) for text in texts])
    return dialogues


def chat(id: str, *texts: str, **meta) -> dict:
    return conversation(id, "test", alternate(texts), meta)


def items(records: list[dict], kind: str = "conversation") -> list[Item]:
    return [Item(kind, f"test:{i + 1}", record) for i, record in enumerate(records)]


def config(**sections) -> CleanConfig:
    """The default clean config (one process) with some params overridden, as params.yaml would."""
    return from_dict(CleanConfig, {"num_proc": 1, **sections}, "clean")


def write_raw(root: Path, conversations=(), documents=(), preferences=()) -> None:
    """data/raw as the collect stage writes it: a folder of shards per kind (chatforge.shards)."""
    raw = root / "data" / "raw"
    for name, records in (("conversations", conversations), ("documents", documents), ("preferences", preferences)):
        with ShardWriter(raw / name) as shards:
            for record in records:
                shards.write(record)
