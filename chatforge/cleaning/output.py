"""The last pass, in input order: the engine's working shards (kept and dropped records of every task)
are merged by records.order_key, dedup decisions applied, splits assigned, and data/clean written as a
stream; the report is counted on the way."""
from __future__ import annotations

import heapq
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import orjson

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.duplicates import DUPLICATE_ID, EXACT, KEPT, NEAR, Duplicates
from chatforge.cleaning.records import KINDS
from chatforge.conversation import split_of

SPLITS = ("train", "val", "test")
# what each dedup decision is called in the report and dropped.jsonl
DEDUP_DROPS = {DUPLICATE_ID: ("structure", "duplicate_id"), EXACT: ("exact_dedup", "duplicate"),
               NEAR: ("near_dedup", "near_duplicate")}


def _rows(path: Path, rank: int | None) -> Iterator[tuple[int, int, int, dict]]:
    """(order, rank, index, metadata) for each line of a working shard; rank None: a dropped-records shard."""
    with open(path, "rb") as handle:
        for index, line in enumerate(handle):
            row = orjson.loads(line)
            yield row["order"], -1 if rank is None else rank, index, row


def merged_rows(work: Path, tasks: int) -> Iterator[tuple[int, int, int, dict]]:
    kept = [_rows(work / "kept" / f"{rank:05d}.jsonl", rank) for rank in range(tasks)
            if (work / "kept" / f"{rank:05d}.jsonl").exists()]
    dropped = [_rows(path, None) for path in sorted((work / "dropped").glob("*/*.jsonl"))]
    return heapq.merge(*kept, *dropped, key=lambda row: row[0])


class OutputFiles:
    """The files of data/clean, written line by line (inside the stage's temporary output folder)."""

    def __init__(self, folder: Path):
        names = {("conversation", split): f"{split}.jsonl" for split in SPLITS}
        names |= {("document", split): f"documents_{split}.jsonl" for split in SPLITS}
        names |= {("preference", "all"): "preferences.jsonl", ("dropped", None): "dropped.jsonl"}
        self.handles = {key: open(folder / name, "w", encoding="utf-8") for key, name in names.items()}

    def write(self, key: tuple, record: dict) -> None:
        self.handles[key].write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def write_outputs(work: Path, tasks: int, duplicates: Duplicates, config: CleanConfig, folder: Path,
                  on_record: Callable[[], None] = lambda: None) -> dict:
    """Write data/clean's files into `folder`; returns the report's counts."""
    fractions = config.split.fractions()
    outputs = {kind: Counter() for kind in KINDS}
    drops = {kind: Counter() for kind in KINDS}
    truncated, pii, languages, language_outcomes, dedup_counts = Counter(), Counter(), Counter(), Counter(), Counter()
    files = OutputFiles(folder)
    try:
        for order, rank, index, row in merged_rows(work, tasks):
            on_record()
            kind, record = row["kind"], row["record"]
            if row.get("language_outcome"):
                language_outcomes[row["language_outcome"]] += 1
            status = KEPT if rank < 0 else duplicates.status[rank][index]
            if rank < 0 or status != KEPT:
                drop, extra = row.get("drop"), {}
                if drop is None:
                    stage, reason = DEDUP_DROPS[status]
                    drop = {"stage": stage, "reason": reason,
                            "detail": "another record has this id" if status == DUPLICATE_ID else ""}
                    if status != DUPLICATE_ID:
                        dedup_counts[f"{kind}_{'exact' if status == EXACT else 'near'}"] += 1
                        extra = {"duplicate_of": duplicates.id_of(int(duplicates.original[rank][index]))}
                drops[kind][f"{drop['stage']}/{drop['reason']}"] += 1
                files.write(("dropped", None), {"kind": kind, "id": row["input"].get("id"), "where": row["where"],
                                                **drop, **extra, "record": row["input"]})
                continue
            truncated.update([row["truncated"]] if row.get("truncated") else [])
            pii.update(row.get("pii") or {})
            if row.get("language"):
                languages[row["language"]] += 1
            split = "all" if kind == "preference" else split_of(config.split.key(record, kind), fractions)
            outputs[kind][split] += 1
            files.write((kind, split), record)
    finally:
        files.close()
    return {
        "output": {kind: dict(sorted(outputs[kind].items())) for kind in KINDS},
        "dropped": {kind: dict(sorted(drops[kind].items())) for kind in KINDS},
        "dropped_total": sum(sum(counts.values()) for counts in drops.values()),
        "truncated": {"total": sum(truncated.values()), "by_reason": dict(sorted(truncated.items()))},
        "pii_replacements": {name: pii.get(name, 0) for name in sorted(set(config.pii.types) | set(pii))},
        "language": {"kept": dict(languages.most_common()), "outcomes": dict(sorted(language_outcomes.items()))},
        "dedup_counts": dict(sorted(dedup_counts.items())),
    }
