"""The deciding half of out-of-core dedup, in input order (records.order_key), so results never depend
on the number of tasks: duplicate ids, then exact duplicates, then near duplicates; each keeps the first
record in input order among those still kept, as the in-memory pipeline did.

Memory: one byte of status per record, plus one key partition (1/PARTITIONS of the keys) or the near
candidate pairs at a time; record orders, signatures and originals stay in files (memory-mapped).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.dedup import jaccard
from chatforge.cleaning.dedup_index import KEY_ENTRY, PARTITIONS
from chatforge.cleaning.records import kind_of_order

KEPT, DUPLICATE_ID, EXACT, NEAR = range(4)
_DUPS = np.dtype([("file_a", "<u4"), ("doc_a", "<u4"), ("file_b", "<u4"), ("doc_b", "<u4")])


@dataclass
class Duplicates:
    status: list[np.ndarray]      # per task: KEPT | DUPLICATE_ID | EXACT | NEAR per record index
    original: list[np.ndarray]    # per task: the kept record a duplicate repeats, as rank << 32 | index
    clusters: dict[str, Counter]  # per kind: how many near duplicates each kept original has
    rejected: Counter             # per kind: MinHash matches whose exact shingle Jaccard is under the threshold

    def originals(self) -> set[int]:
        return {int(v) for values in self.original for v in np.unique(values[values >= 0])}


def _member(rank, index) -> int:
    return (int(rank) << 32) | int(index)


def _first_of_each_key(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of repeated keys, position of the first entry of the same key), in input order."""
    entries = entries[np.lexsort((entries["order"], entries["key"]))]
    repeated = np.concatenate([[False], entries["key"][1:] == entries["key"][:-1]])
    first = np.maximum.accumulate(np.where(repeated, 0, np.arange(len(entries))))
    return entries, repeated, first


class DuplicateFinder:
    def __init__(self, work: Path, config: CleanConfig, tasks: int):
        self.work, self.config, self.tasks = work, config, tasks
        self.orders = [self._array(f"order/{rank:05d}.bin", np.uint64) for rank in range(tasks)]
        self.status = [np.zeros(len(order), np.uint8) for order in self.orders]
        self.original = [np.lib.format.open_memmap(work / f"original-{rank:05d}.npy", "w+", np.int64, (len(order),))
                         for rank, order in enumerate(self.orders)]
        for values in self.original:
            values[:] = -1
        self.clusters = {"conversation": Counter(), "document": Counter()}
        self.rejected = Counter()

    def _array(self, relative: str, dtype) -> np.ndarray:
        path = self.work / relative
        return np.memmap(path, dtype, "r") if path.exists() and path.stat().st_size else np.zeros(0, dtype)

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

    def _near_candidates(self) -> list[tuple[int, int, int, int]]:
        """(later order, earlier order, later, earlier) for records sharing a bucket. datatrove's bucket step
        writes each run of equal bands as a chain of pairs; every earlier member of a run is a candidate."""
        limit, pairs = self.config.near_dedup.max_candidates, set()
        for path in sorted((self.work / "dups").glob("*.dups")):
            rows = np.fromfile(path, _DUPS)
            members: list[int] = []
            for file_a, doc_a, file_b, doc_b in rows.tolist():
                a = _member(file_a, doc_a)
                if not members or members[-1] != a:
                    self._add_run(members, limit, pairs)
                    members = [a]
                members.append(_member(file_b, doc_b))
            self._add_run(members, limit, pairs)
        return sorted(pairs)

    def _add_run(self, members: list[int], limit: int, pairs: set) -> None:
        ordered = sorted((int(self.orders[m >> 32][m & 0xFFFFFFFF]), m) for m in members)
        for position, (later_order, later) in enumerate(ordered):
            for earlier_order, earlier in ordered[:min(position, limit)]:
                pairs.add((later_order, earlier_order, later, earlier))

    def _shingle_hashes(self, member: int) -> np.ndarray:
        rank, index = member >> 32, member & 0xFFFFFFFF
        ends, hashes = self.shingle_ends[rank], self.shingle_values[rank]
        return hashes[int(ends[index - 1]) if index else 0:int(ends[index])]

    def _mark_near_duplicates(self) -> None:
        near = self.config.near_dedup
        sigs = [self._array(f"sigs/{rank:05d}.bin", np.uint32).reshape(-1, near.num_perm) for rank in range(self.tasks)]
        self.shingle_ends = [self._array(f"shingles/{rank:05d}.end", np.uint64) for rank in range(self.tasks)]
        self.shingle_values = [self._array(f"shingles/{rank:05d}.bin", np.uint64) for rank in range(self.tasks)]
        best: dict[int, tuple[float, int]] = {}  # for the record being decided: its most similar kept original
        pairs = self._near_candidates()
        for number, (later_order, earlier_order, later, earlier) in enumerate(pairs):
            rank, index = later >> 32, later & 0xFFFFFFFF
            kind = kind_of_order(later_order)
            if self.status[rank][index] == KEPT and kind == kind_of_order(earlier_order) \
                    and self.status[earlier >> 32][earlier & 0xFFFFFFFF] == KEPT:
                similarity = np.count_nonzero(sigs[rank][index] == sigs[earlier >> 32][earlier & 0xFFFFFFFF]) / near.num_perm
                if near.verify and similarity >= near.threshold:  # the estimate is ±0.04 at 128 values
                    similarity = jaccard(self._shingle_hashes(later), self._shingle_hashes(earlier))
                    if similarity < near.threshold:
                        self.rejected[kind] += 1
                # highest similarity wins; ties go to the earliest kept record (pairs come in that order)
                if similarity >= near.threshold and similarity > best.get(later, (-1.0, 0))[0]:
                    best[later] = (similarity, earlier)
            if number + 1 == len(pairs) or pairs[number + 1][2] != later:  # last candidate of this record
                if later in best:
                    _, original = best.pop(later)
                    self.status[rank][index] = NEAR
                    self.original[rank][index] = original
                    self.clusters[kind][original] += 1

    def find(self) -> Duplicates:
        self._mark_key_duplicates("ids", DUPLICATE_ID)
        if self.config.exact_dedup:
            self._mark_key_duplicates("exact", EXACT)
        if self.config.near_dedup.enabled:
            self._mark_near_duplicates()
        for values in self.original:
            values.flush()
        return Duplicates(self.status, self.original, self.clusters, self.rejected)
