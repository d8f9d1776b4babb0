"""The engine's reader: our shard folders (gzip JSONL, one folder per kind) as datatrove Documents.

Work is split into units that are whole shards when there are at least as many shards with data as tasks (task
`rank` takes shards rank, rank + tasks, ... as datatrove's readers do); with fewer shards, into blocks of
`chunk_size` lines taken in turn, so small inputs still use every task. Bad lines are counted by reason
with file:line (each line by exactly one task) and written with the input counts to reader/RANK.json.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from chatforge.cleaning.records import order_key, to_document
from chatforge.files import SkipLog
from chatforge.shards import iter_shard, shard_paths


def has_data(path: Path) -> bool:
    """False for an empty shard (collect writes part-00000 for a kind without records)."""
    try:
        with gzip.open(path, "rb") as handle:
            return bool(handle.read(1))
    except (OSError, EOFError, zlib.error):
        return True  # a broken shard is read, so that iter_shard stops with its one error line


def shard_files(inputs: dict[str, str]) -> list[tuple[str, int, Path]]:
    """(kind, shard number, path) of every shard with data, in input order."""
    return [(kind, number, path) for kind, folder in inputs.items()
            for number, path in enumerate(shard_paths(folder)) if has_data(path)]


class ShardReader(PipelineStep):
    name = "chatforge shards"
    type = "📖 - READER"

    def __init__(self, inputs: dict[str, str], work: str, chunk_size: int):
        super().__init__()
        self.inputs, self.work, self.chunk_size = inputs, work, chunk_size

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = shard_files(self.inputs)
        by_shard = len(files) >= world_size
        skips, counts = SkipLog(), Counter()
        for number, (kind, shard, path) in enumerate(files):
            if by_shard and number % world_size != rank:
                continue
            # by line blocks every task reads every shard, so only task 0 counts the bad lines
            for line, record in iter_shard(path, skips if by_shard or rank == 0 else SkipLog()):
                if not by_shard and (number + (line - 1) // self.chunk_size) % world_size != rank:
                    continue
                counts[kind] += 1
                self.stat_update(kind)
                yield to_document(kind, f"{path}:{line}", order_key(kind, shard, line), record)
        summary = Path(self.work) / "reader" / f"{rank:05d}.json"
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps({"input": counts, "skips": skips.as_dict()}))
