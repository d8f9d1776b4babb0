"""Shared helpers for the clean-stage tests: real dialogues from the installed chatterbot-corpus, raw shard
folders, and the clean pipeline run on them through datatrove's local executor."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.engine import clean_shards
from chatforge.conversation import alternate, conversation
from chatforge.params import from_dict
from chatforge.shards import ShardWriter

FOLDERS = {"conversation": "conversations", "document": "documents", "preference": "preferences"}


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


def config(**sections) -> CleanConfig:
    """The default clean config (one task) with some params overridden, as params.yaml would."""
    return from_dict(CleanConfig, {"tasks": 1, "workers": 1, **sections}, "clean")


def write_raw(root: Path, conversations=(), documents=(), preferences=(), per_shard: int = 100_000) -> Path:
    """data/raw as the collect stage writes it: a folder of shards per kind (chatforge.shards); returns it."""
    raw = root / "data" / "raw"
    for name, records in zip(FOLDERS.values(), (conversations, documents, preferences)):
        with ShardWriter(raw / name, per_shard) as shards:
            for record in records:
                shards.write(record)
    return raw


@dataclass
class Result:
    splits: dict[str, dict[str, list[dict]]]   # kind → split → records (preferences: "all")
    dropped: list[dict]
    report: dict


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def clean(root: Path, cfg: CleanConfig, conversations=(), documents=(), preferences=(), per_shard: int = 100_000) -> Result:
    """Write the records as raw shards under `root`, clean them through the engine, read the outputs back."""
    root = root / f"run-{len(list(root.glob('run-*')))}"  # a fresh folder for each run of a test
    raw = write_raw(root, conversations, documents, preferences, per_shard)
    out = root / "clean"
    out.mkdir()
    report, skips = clean_shards({kind: raw / folder for kind, folder in FOLDERS.items()}, cfg, out)
    names = {"conversation": "{}.jsonl", "document": "documents_{}.jsonl"}
    splits = {kind: {split: records for split in ("train", "val", "test")
                     if (records := _read(out / name.format(split)))} for kind, name in names.items()}
    splits["preference"] = {"all": records} if (records := _read(out / "preferences.jsonl")) else {}
    return Result(splits, _read(out / "dropped.jsonl"), {**report, "skipped_lines": skips.as_dict()})
