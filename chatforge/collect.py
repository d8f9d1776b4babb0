"""The collect stage: run the sources listed in `collect.sources`, write data/raw/ and a report.

Every record a source yields is checked against the schema (chatforge.conversation) before it is
written; what fails is counted by reason with its file:line, like the sources' own skips. Records
stream from each source straight into gzip JSONL shards, one folder per kind (chatforge.shards),
inside a temporary folder that replaces the output folder only when every source has run, so a
failed run leaves the previous outputs untouched and nothing half-written.
"""
from __future__ import annotations

import sqlite3
import sysconfig
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from chatforge.console import log, progress
from chatforge.conversation import InvalidRecord, check_conversation, check_document, check_preference
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog, atomic_path
from chatforge.params import from_dict, require
from chatforge.shards import ShardWriter, write_manifest
from chatforge.sources import SOURCE_TYPES, source_module
from chatforge.sources.common import SourceConfig

KINDS = ("conversations", "documents", "preferences")
CHECKS = {"conversations": check_conversation, "documents": check_document, "preferences": check_preference}
EXAMPLES_PER_SOURCE = 5


@dataclass
class CollectConfig:
    sources: list[dict] = field(default_factory=list)  # each: {type, name, options of that type}
    records_per_shard: int = 100_000

    def validate(self, section: str) -> None:
        require(bool(self.sources), f"{section}.sources", "is empty; list at least one source (see docs/sources.md)")
        require(self.records_per_shard >= 1, f"{section}.records_per_shard",
                f"={self.records_per_shard}: must be at least 1")


@dataclass
class Source:
    label: str  # how errors name it: "collect.sources[1] (name=reddit)"
    module: ModuleType
    config: SourceConfig


def build_sources(config: CollectConfig) -> list[Source]:
    """Each entry's typed config, checked before any source runs (types, names, options, paths)."""
    sources: list[Source] = []
    index_of_name: dict[str, int] = {}
    for index, entry in enumerate(config.sources):
        key = f"collect.sources[{index}]"
        if not isinstance(entry, dict):
            raise ChatforgeError(f"params.yaml: {key} must be a mapping with type, name and options")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ChatforgeError(f"params.yaml: {key} needs a `name`: a unique string that prefixes its record ids")
        label = f"{key} (name={name})"
        if entry.get("type") not in SOURCE_TYPES:
            raise ChatforgeError(f"params.yaml: {label}: unknown type {entry.get('type')!r}; "
                                 f"use one of {', '.join(SOURCE_TYPES)}")
        if name in index_of_name:
            raise ChatforgeError(f"params.yaml: {label}: name already used by collect.sources[{index_of_name[name]}]; "
                                 f"give each source a unique name")
        index_of_name[name] = index
        module = source_module(entry["type"])
        sources.append(Source(label, module, from_dict(module.Config, entry, label)))
    return sources


def portable(where: str) -> str:
    """`where` (a skip's `path:line`) with an absolute path made machine-independent: relative to the
    site-packages folder an installed corpus lives in (`chatterbot_corpus/data/...`), else to the project (as
    params.yaml writes paths), so reports/collect.json reads the same on every clone."""
    if not where.startswith("/"):
        return where
    roots = {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")} | {str(Path.cwd())}
    for root in sorted(roots, key=len, reverse=True):  # the deepest first: the venv lies inside the project
        if where.startswith(root.rstrip("/") + "/"):
            return where[len(root.rstrip("/")) + 1:]
    return where


def record_kind(record: dict) -> str:
    return "conversations" if "turns" in record else "documents" if "text" in record else "preferences"


def check_record(kind: str, record: dict) -> None:
    """Schema check plus no blank turn (an empty prompt or reply teaches nothing)."""
    CHECKS[kind](record)
    turns = record["turns"] if kind == "conversations" else [] if kind == "documents" else (
        record["prompt"] + record["chosen"] + record["rejected"])
    if any(not t["content"].strip() for t in turns):
        raise InvalidRecord("empty_turn", "a turn has no text")


class SeenIds:
    """The record ids written so far, per kind, in an on-disk table: a Python set of every id would
    grow with the input (~100 bytes an id); this costs ~8 us a record and a bounded page cache."""

    def __init__(self, folder: Path):
        self._db = sqlite3.connect(folder / "seen_ids.sqlite", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16000"):  # a scratch table, 16 MB cache
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE ids (kind TEXT, id TEXT, PRIMARY KEY (kind, id)) WITHOUT ROWID")
        self._db.execute("BEGIN")  # one transaction, never committed: a commit per insert is 10x slower
        self._cursor = self._db.cursor()

    def add(self, kind: str, record_id: str) -> bool:
        """True when the id is new for that kind."""
        self._cursor.execute("INSERT OR IGNORE INTO ids VALUES (?, ?)", (kind, record_id))
        return self._cursor.rowcount == 1

    def close(self) -> None:
        self._db.close()


def run_source(source: Source, outputs: dict, seen_ids: SeenIds, bar) -> dict:
    """Write one source's valid records to `outputs` (a ShardWriter per kind); its report entry."""
    name = source.config.name
    skips = SkipLog(max_examples=EXAMPLES_PER_SOURCE)
    written: Counter = Counter()
    task = bar.add_task(name, total=None, info="")
    start = time.perf_counter()
    try:
        for where, record in source.module.load(source.config, skips):
            kind = record_kind(record)
            try:
                check_record(kind, record)
            except InvalidRecord as error:
                skips.skip(error.reason, where, str(error))
                continue
            if not seen_ids.add(kind, record["id"]):
                skips.skip("duplicate_id", where, record["id"])
                continue
            outputs[kind].write(record)
            written[kind] += 1
            bar.update(task, advance=1, info=f"{skips.total} skipped")
    except ChatforgeError as error:
        raise ChatforgeError(f"{source.label}: {error}") from None
    except (OSError, EOFError) as error:  # unreadable or truncated file (e.g. a cut-off .gz)
        raise ChatforgeError(f"{source.label}: cannot read input: {error}; fix or re-download the file") from None
    bar.update(task, total=sum(written.values()), info=f"{skips.total} skipped")
    read = sum(written.values()) + skips.total
    reasons = ", ".join(f"{reason} {count}" for reason, count in skips.counts.most_common(4))
    log("collect", f"{name} ({source.config.type}): read {read}, skipped {skips.total}"
                   + (f" ({reasons})" if reasons else "") + ", wrote "
                   + ", ".join(f"{written[kind]} {kind}" for kind in KINDS if written[kind]))
    skips.examples = [portable(example) for example in skips.examples]
    return {"type": source.config.type, "read": read, "written": {kind: written[kind] for kind in KINDS},
            "skipped": skips.as_dict(), "seconds": round(time.perf_counter() - start, 2)}


def collect(sources: list[Source], out_dir: str | Path, records_per_shard: int = 100_000) -> dict:
    """Run every source into `out_dir`/{conversations,documents,preferences}/ shards; the report."""
    report: dict = {"sources": {}}
    with atomic_path(out_dir, is_dir=True) as tmp, tempfile.TemporaryDirectory(prefix="chatforge-collect-") as scratch, \
            progress() as bar:
        with ExitStack() as open_outputs:
            seen_ids = SeenIds(Path(scratch))
            open_outputs.callback(seen_ids.close)
            outputs = {kind: open_outputs.enter_context(ShardWriter(tmp / kind, records_per_shard)) for kind in KINDS}
            for source in sources:
                report["sources"][source.config.name] = run_source(source, outputs, seen_ids, bar)
        write_manifest(tmp, outputs)
    entries = report["sources"].values()
    report["totals"] = {
        "read": sum(entry["read"] for entry in entries),
        "written": {kind: sum(entry["written"][kind] for entry in entries) for kind in KINDS},
        "skipped": sum(entry["skipped"]["total"] for entry in entries),
    }
    log("collect", f"wrote {out_dir}: " + ", ".join(f"{count} {kind}" for kind, count in report["totals"]["written"].items()))
    return report
