"""The deciding half of out-of-core dedup, in input order (records.order_key), so results never depend
on the number of tasks: duplicate ids, then exact duplicates, then near duplicates; each keeps the first
record in input order among those still kept, as the in-memory pipeline did.

Memory: one byte of status per record, plus one key partition (1/PARTITIONS of the keys) or one range of
near candidate pairs (those of RECORDS_PER_RANGE records) at a time; record orders and originals stay in
files (memory-mapped, 8 bytes a record each); signatures, shingles and ids are read row by row (FileRows).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.dedup import jaccard
from chatforge.cleaning.dedup_index import KEY_ENTRY, PARTITIONS, FileRows, RaggedFile, memmap_or_empty
from chatforge.cleaning.records import KINDS, kind_indices, kind_of_order

KEPT, DUPLICATE_ID, EXACT, NEAR = range(4)
_DUPS = np.dtype([("file_a", "<u4"), ("doc_a", "<u4"), ("file_b", "<u4"), ("doc_b", "<u4")])
# a near candidate; sorted by these fields = decided in input order, each record's earlier candidates first
_PAIR = np.dtype([("later_order", "<u8"), ("earlier_order", "<u8"), ("later", "<u8"), ("earlier", "<u8")])
RECORDS_PER_RANGE = 100_000  # records whose candidate pairs are sorted and decided in memory together
ROWS_PER_READ = 65_536       # rows of a datatrove .dups file, or candidate pairs, turned into Python at once


@dataclass
class Duplicates:
    status: list[np.ndarray]      # per task: KEPT | DUPLICATE_ID | EXACT | NEAR per record index
    original: list[np.ndarray]    # per task: the kept record a duplicate repeats, as rank << 32 | index
    ids: list[RaggedFile]         # per task: record ids, to name the original a duplicate repeats
    clusters: dict[str, dict]     # per kind: {clusters, largest_cluster} of near duplicates
    rejected: Counter             # per kind: MinHash matches whose exact shingle Jaccard is under the threshold

    def id_of(self, member: int) -> str:
        return bytes(self.ids[member >> 32][member & 0xFFFFFFFF]).decode("utf-8")


def _member(rank, index) -> int:
    return (int(rank) << 32) | int(index)


def _first_of_each_key(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of repeated keys, position of the first entry of the same key), in input order."""
    entries = entries[np.lexsort((entries["order"], entries["key"]))]
    repeated = np.concatenate([[False], entries["key"][1:] == entries["key"][:-1]])
    first = np.maximum.accumulate(np.where(repeated, 0, np.arange(len(entries))))
    return entries, repeated, first


class CandidateSpill:
    """Near candidate pairs spilled to files by ranges of the later record's input order, so that deciding
    them in input order holds one range's pairs in memory, not all of them. The range bounds are quantiles
    of a sample of the orders, so each range holds about RECORDS_PER_RANGE records."""

    def __init__(self, folder: Path, orders: list[np.ndarray]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        total = sum(len(order) for order in orders)
        step = max(1, total // 100_000)
        sample = np.sort(np.concatenate([order[::step] for order in orders] or [np.zeros(0, np.uint64)]))
        ranges = max(1, -(-total // RECORDS_PER_RANGE))
        cuts = np.linspace(0, len(sample), ranges + 1)[1:-1].astype(int)
        self.bounds = np.unique(sample[cuts]) if len(sample) else np.zeros(0, np.uint64)
        self.buffer: list[tuple[int, int, int, int]] = []

    def _path(self, number: int) -> Path:
        return self.folder / f"{number:05d}.bin"

    def add(self, pair: tuple[int, int, int, int]) -> None:
        self.buffer.append(pair)
        if len(self.buffer) >= ROWS_PER_READ:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        pairs = np.array(self.buffer, _PAIR)
        where = np.searchsorted(self.bounds, pairs["later_order"], side="right")
        for number in np.unique(where):
            with open(self._path(number), "ab") as handle:
                handle.write(pairs[where == number].tobytes())
        self.buffer.clear()

    def ranges(self):
        """Each range's distinct pairs, sorted, with a flag marking each record's last candidate; in input order."""
        self.flush()
        for number in range(len(self.bounds) + 1):
            path = self._path(number)
            if not path.exists():
                continue
            pairs = np.unique(np.fromfile(path, _PAIR))
            path.unlink()
            last = np.append(pairs["later"][1:] != pairs["later"][:-1], True)
            for start in range(0, len(pairs), ROWS_PER_READ):
                yield from zip(pairs[start:start + ROWS_PER_READ].tolist(), last[start:start + ROWS_PER_READ].tolist())


class DuplicateFinder:
    def __init__(self, work: Path, config: CleanConfig, tasks: int):
        self.work, self.config, self.tasks = work, config, tasks
        self.orders = [self._array(f"order/{rank:05d}.bin", np.uint64) for rank in range(tasks)]
        self.status = [np.zeros(len(order), np.uint8) for order in self.orders]
        self.original = [np.lib.format.open_memmap(work / f"original-{rank:05d}.npy", "w+", np.int64, (len(order),))
                         for rank, order in enumerate(self.orders)]
        for values in self.original:
            values[:] = -1
        self.rejected = Counter()

    def _array(self, relative: str, dtype) -> np.ndarray:
        return memmap_or_empty(self.work / relative, dtype)

    def _keys(self, family: str, partition: int) -> np.ndarray:
        parts = []
        for rank in range(self.tasks):
            entries = self._array(f"keys/{family}/{partition:03d}/{rank:05d}.bin", KEY_ENTRY)
            with_rank = np.empty(len(entries), KEY_ENTRY.descr + [("rank", "<u4")])
            for name in KEY_ENTRY.names:
                with_rank[name] = entries[name]
            with_rank["rank"] = rank
            parts.append(with_rank)
        return np.concatenate(parts)

    def _mark_key_duplicates(self, family: str, status: int) -> None:
        for partition in range(PARTITIONS):
            entries = self._keys(family, partition)
            still_kept = np.zeros(len(entries), bool)
            for rank in range(self.tasks):
                mine = entries["rank"] == rank
                still_kept[mine] = self.status[rank][entries["index"][mine]] == KEPT
            entries, repeated, first = _first_of_each_key(entries[still_kept])
            for position in np.flatnonzero(repeated):
                rank, index = entries["rank"][position], entries["index"][position]
                self.status[rank][index] = status
                origin = entries[first[position]]
                self.original[rank][index] = _member(origin["rank"], origin["index"])

    def _near_candidates(self) -> CandidateSpill:
        """(later order, earlier order, later, earlier) for records sharing a bucket. datatrove's bucket step
        writes each run of equal bands as a chain of pairs; every earlier member of a run is a candidate."""
        spill = CandidateSpill(self.work / "candidates", self.orders)
        for path in sorted((self.work / "dups").glob("*.dups")):
            rows, members = np.memmap(path, _DUPS, "r") if path.stat().st_size else [], []
            for start in range(0, len(rows), ROWS_PER_READ):
                for file_a, doc_a, file_b, doc_b in rows[start:start + ROWS_PER_READ].tolist():
                    a = _member(file_a, doc_a)
                    if not members or members[-1] != a:
                        self._add_run(members, spill)
                        members = [a]
                    members.append(_member(file_b, doc_b))
            self._add_run(members, spill)
        return spill

    def _add_run(self, members: list[int], spill: CandidateSpill) -> None:
        limit = self.config.near_dedup.max_candidates
        ordered = sorted((int(self.orders[m >> 32][m & 0xFFFFFFFF]), m) for m in members)
        for position, (later_order, later) in enumerate(ordered):
            for earlier_order, earlier in ordered[:min(position, limit)]:
                spill.add((later_order, earlier_order, later, earlier))

    def _mark_near_duplicates(self) -> None:
        near = self.config.near_dedup
        best: dict[int, tuple[float, int]] = {}  # for the record being decided: its most similar kept original
        sigs = [FileRows(self.work / f"sigs/{rank:05d}.bin", np.uint32, near.num_perm) for rank in range(self.tasks)]
        shingles = [RaggedFile(self.work, f"shingles/{rank:05d}", np.uint64) for rank in range(self.tasks)]
        for (later_order, earlier_order, later, earlier), last_candidate in self._near_candidates().ranges():
            rank, index = later >> 32, later & 0xFFFFFFFF
            kind = kind_of_order(later_order)
            if self.status[rank][index] == KEPT and kind == kind_of_order(earlier_order) \
                    and self.status[earlier >> 32][earlier & 0xFFFFFFFF] == KEPT:
                similarity = np.count_nonzero(sigs[rank][index] == sigs[earlier >> 32][earlier & 0xFFFFFFFF]) / near.num_perm
                if near.verify and similarity >= near.threshold:  # the estimate is ±0.04 at 128 values
                    similarity = jaccard(shingles[rank][index], shingles[earlier >> 32][earlier & 0xFFFFFFFF])
                    if similarity < near.threshold:
                        self.rejected[kind] += 1
                # highest similarity wins; ties go to the earliest kept record (pairs come in that order)
                if similarity >= near.threshold and similarity > best.get(later, (-1.0, 0))[0]:
                    best[later] = (similarity, earlier)
            if last_candidate and later in best:
                _, original = best.pop(later)
                self.status[rank][index] = NEAR
                self.original[rank][index] = original

    def _near_clusters(self) -> dict[str, dict]:
        """Per kind: the number of clusters of near duplicates and the largest one (its original included),
        counted from the decisions: one int64 per near duplicate in memory, for the moment of counting."""
        originals = {kind: [] for kind in ("conversation", "document")}
        for rank in range(self.tasks):
            near = np.flatnonzero(self.status[rank] == NEAR)
            kinds = kind_indices(np.asarray(self.orders[rank][near]))
            for kind, parts in originals.items():
                parts.append(np.asarray(self.original[rank][near[kinds == KINDS.index(kind)]]))
        clusters = {}
        for kind, parts in originals.items():
            _, sizes = np.unique(np.concatenate(parts) if parts else np.zeros(0, np.int64), return_counts=True)
            clusters[kind] = {"clusters": len(sizes), "largest_cluster": 1 + int(sizes.max()) if len(sizes) else 0}
        return clusters

    def find(self) -> Duplicates:
        self._mark_key_duplicates("ids", DUPLICATE_ID)
        if self.config.exact_dedup:
            self._mark_key_duplicates("exact", EXACT)
        if self.config.near_dedup.enabled:
            self._mark_near_duplicates()
        for values in self.original:
            values.flush()
        ids = [RaggedFile(self.work, f"record_ids/{rank:05d}", np.uint8) for rank in range(self.tasks)]
        return Duplicates(self.status, self.original, ids, self._near_clusters(), self.rejected)
