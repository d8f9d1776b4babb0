"""JSONL and file helpers: atomic writes, and reading that skips bad lines with a counted reason."""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from chatforge.errors import ChatforgeError


@dataclass
class SkipLog:
    """Counts skipped input records by reason and keeps the first few examples with file:line."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def skip(self, reason: str, where: str = "", detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())), "examples": self.examples}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MB blocks (model weights and shards can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it over `path`, on failure remove it.

    An interrupted stage therefore never leaves a half-written output behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) if is_dir else Path(
        tempfile.mktemp(prefix=f".{target.name}.", dir=target.parent)
    )
    if is_dir:  # mkdtemp makes it private (0700); the output folder gets the usual umask permissions
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if is_dir and target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records atomically, one JSON object a line; returns the count."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def open_text(path: str | os.PathLike, encoding: str = "utf-8", errors: str = "strict") -> io.TextIOBase:
    """Open a text file that may be gzip (.gz) or zstandard (.zst) compressed."""
    path = Path(path)
    if not path.exists():
        raise ChatforgeError(f"{path}: file not found; check the path in params.yaml")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, errors=errors)
    if path.suffix == ".zst":
        import zstandard

        # Pushshift dumps use a long window; without max_window_size decompression fails.
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(open(path, "rb"))
        return io.TextIOWrapper(reader, encoding=encoding, errors=errors)
    return open(path, encoding=encoding, errors=errors)


def iter_jsonl(path: str | os.PathLike, skips: SkipLog | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each JSON object line; bad lines are skipped and counted.

    Without a SkipLog a bad line is an error naming the file and line.
    """
    with open_text(path, errors="surrogateescape") as handle:
        for lineno, line in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            reason = None
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                reason = "bad_encoding"
            if reason is None:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as error:
                    reason, detail = "bad_json", str(error)
                else:
                    if isinstance(obj, dict):
                        yield lineno, obj
                        continue
                    reason, detail = "not_an_object", type(obj).__name__
            else:
                detail = "not valid UTF-8"
            if skips is None:
                raise ChatforgeError(f"{where}: {reason} ({detail}); fix or remove that line")
            skips.skip(reason, where, detail)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by a previous stage (strict: any bad line is an error)."""
    return [obj for _, obj in iter_jsonl(path)]


def append_jsonl_locked(path: str | os.PathLike, record: dict | list[dict]) -> None:
    """Append one record as one line (or a list of records, all together), safe with concurrent writers.

    An exclusive lock plus a single write keeps lines whole; a file whose last line lacks its newline
    (an earlier crash) gets one first, so the new record never joins a broken line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = record if isinstance(record, list) else [record]
    line = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in records).encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
    finally:
        os.close(fd)
