"""Sharded record folders: how collect writes data/raw and how every later stage reads it.

Layout (one folder per kind, each always present):

    data/raw/conversations/part-00000.jsonl.gz, part-00001.jsonl.gz, …
    data/raw/documents/part-00000.jsonl.gz
    data/raw/preferences/part-00000.jsonl.gz
    data/raw/manifest.json      {"format": "jsonl.gz", "records_per_shard": N,
                                 "kinds": {"conversations": {"records": n, "shards": k}, …}}

A shard is gzip-compressed JSONL (one record a line, UTF-8), at most `records_per_shard` records.
A kind with no records has one empty shard, so its folder is never empty: neither DVC nor git
keeps an empty folder, and a reader would then have to tell "no records" from "missing".
Shards are written with gzip mtime 0, so the same records give the same bytes (DVC hashes them).
Reading order is deterministic: shards by name, lines in order.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog, atomic_path, iter_jsonl, write_json

FORMAT = "jsonl.gz"
SHARD_GLOB = "part-*.jsonl.gz"
MANIFEST = "manifest.json"
# zlib level 6 (its default): 3% larger than level 9 at 1.8x its speed (measured on the default conversations).
COMPRESS_LEVEL = 6


def shard_name(index: int) -> str:
    return f"part-{index:05d}.jsonl.gz"


class ShardWriter:
    """Writes records into `folder` as shards of `records_per_shard`; the folder appears only on a clean close.

    Used as a context manager: the shards go to a temporary sibling folder that replaces `folder`
    when the block ends without an exception, and is removed otherwise.
    """

    def __init__(self, folder: str | Path, records_per_shard: int = 100_000):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard={records_per_shard}: must be at least 1")
        self.folder = Path(folder)
        self.records_per_shard = records_per_shard
        self.records = 0
        self.shards = 0
        self._stack = ExitStack()
        self._tmp: Path | None = None
        self._raw = None
        self._handle: io.TextIOBase | None = None

    def __enter__(self) -> ShardWriter:
        self._tmp = self._stack.enter_context(atomic_path(self.folder, is_dir=True))
        self._stack.push(self._finish)  # runs first on exit, so a failed close also discards the folder
        return self

    def __exit__(self, *exc_info) -> bool:
        return self._stack.__exit__(*exc_info)

    def write(self, record: dict) -> None:
        if self.records % self.records_per_shard == 0:
            self._next_shard()
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.records += 1

    def _next_shard(self) -> None:
        self._close_shard()
        self._raw = open(self._tmp / shard_name(self.shards), "wb")
        # filename="" and mtime=0: the gzip header then depends on nothing but the data.
        compressed = gzip.GzipFile(filename="", mode="wb", compresslevel=COMPRESS_LEVEL, fileobj=self._raw, mtime=0)
        self._handle = io.TextIOWrapper(compressed, encoding="utf-8", newline="\n")
        self.shards += 1

    def _close_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closes the GzipFile, which writes the trailer, but not the raw file
            self._raw.close()
            self._handle = None

    def _finish(self, exc_type, exc, traceback) -> bool:
        if exc_type is None and not self.shards:
            self._next_shard()  # an empty kind still gets part-00000
        self._close_shard()
        return False


def write_manifest(root: str | Path, writers: dict[str, ShardWriter]) -> dict:
    """`root`/manifest.json: per kind, its record and shard counts (readers can size work without reading)."""
    manifest = {"format": FORMAT, "records_per_shard": next(iter(writers.values())).records_per_shard,
                "kinds": {kind: {"records": w.records, "shards": w.shards} for kind, w in writers.items()}}
    write_json(Path(root) / MANIFEST, manifest)
    return manifest


def shard_paths(folder: str | Path) -> list[Path]:
    """The shards of one kind, in reading order (by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ChatforgeError(f"{folder}: not found (a folder of {SHARD_GLOB} shards)")
    return sorted(folder.glob(SHARD_GLOB))


def iter_shard(path: str | Path, skips: SkipLog) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every record of one shard, in order.

    Lines that are not a JSON object are counted in `skips` with their shard:line; a shard whose
    gzip stream is corrupt or cut off stops with one error line naming it.
    """
    lineno = 0
    try:
        for lineno, record in iter_jsonl(path, skips):
            yield lineno, record
    except (OSError, EOFError, zlib.error) as error:
        raise ChatforgeError(f"{path}: unreadable gzip after line {lineno} ({error}); "
                             "re-run the stage that wrote it") from None


def iter_records(folder: str | Path, skips: SkipLog) -> Iterator[tuple[str, dict]]:
    """("<shard>:<line>", record) for every record of a folder's shards, in order (as iter_shard reads each)."""
    for path in shard_paths(folder):
        for lineno, record in iter_shard(path, skips):
            yield f"{path}:{lineno}", record
