"""The per-task half of out-of-core dedup: a datatrove pipeline step that writes, for every record that
passed the filters, its keys and MinHash signature to the work folder, and passes the record on.

Files (per task `rank`; a record's index is its position in the task's kept stream):
  order/RANK.bin              uint64 input order of each record (records.order_key)
  keys/{ids,exact}/P/RANK.bin (key, order, index): id and exact-content keys, in `PARTITIONS` files by key,
                              so the decision step sorts one partition at a time
  sigs/RANK.bin               num_perm uint32 MinHash values per record (zeros: no signature)
  shingles/RANK.bin, .end     each record's sorted 64-bit shingle hashes (dedup.shingle_hashes), and
                              uint64 end offsets into them per record: the exact Jaccard check of candidates
  record_ids/RANK.bin, .end   each record's id in UTF-8, and end offsets: a duplicate's `duplicate_of`
  buckets/bucket_B/RANK.minhash.sig  datatrove's MinHash bucket files (bands of `hashes_per_bucket`
                              values + index), sorted by datatrove's MinhashDedupSignature
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.batching import batched
from datatrove.utils.hashing import HashConfig

from chatforge.cleaning.config import CleanConfig, NearDedupConfig
from chatforge.cleaning.dedup import exact_key, naive_signature, shingle_hashes, shingles, signatures
from chatforge.cleaning.records import dedup_texts

PARTITIONS = 16
KEY_ENTRY = np.dtype([("key", "<u8"), ("order", "<u8"), ("index", "<u4")])


def minhash_config(near: NearDedupConfig) -> MinhashConfig:
    """datatrove's MinHash layout for our params: datasketch's LSH bands × rows become buckets ×
    hashes_per_bucket; 32-bit values as datasketch computes them."""
    bands, rows = near.bands_rows()
    return MinhashConfig(n_grams=near.ngram, num_buckets=bands, hashes_per_bucket=rows, seed=near.seed,
                         hash_config=HashConfig(precision=32, hash_fc="sha1"))


class FileRows:
    """Fixed-width rows of a binary file, read with os.pread rather than mapped: pages read this way stay in the
    page cache, where the kernel reclaims them, instead of adding up in this process's RSS as mapped pages do
    (one range of near candidates can reach across the whole file; docs/data-scale.md)."""

    def __init__(self, path: Path, dtype, width: int = 1):
        self.path, self.dtype, self.width = path, np.dtype(dtype), width
        self.row_bytes = self.dtype.itemsize * width
        self.fd = os.open(path, os.O_RDONLY) if path.exists() else None

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 as a (stop - start, width) array."""
        size = (stop - start) * self.row_bytes
        data = os.pread(self.fd, size, start * self.row_bytes) if size > 0 else b""
        if len(data) != max(size, 0):
            raise IndexError(f"{self.path}: rows {start}..{stop - 1} are past its end")
        return np.frombuffer(data, self.dtype).reshape(-1, self.width)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.rows(index, index + 1)[0]

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


class RaggedFile:
    """Read side of a values file + an end-offsets file (one uint64 end per record)."""

    def __init__(self, work: Path, relative: str, dtype):
        self.values = FileRows(work / f"{relative}.bin", dtype)
        self.ends = FileRows(work / f"{relative}.end", np.uint64)

    def __getitem__(self, index: int) -> np.ndarray:
        ends = self.ends.rows(index - 1, index + 1)[:, 0] if index else [0, self.ends[0][0]]
        return self.values.rows(int(ends[0]), int(ends[1]))[:, 0]


def memmap_or_empty(path: Path, dtype) -> np.ndarray:
    return np.memmap(path, dtype, "r") if path.exists() and path.stat().st_size else np.zeros(0, dtype)


def key64(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()[:8], "little")


def content_key(kind: str, record: dict) -> int:
    parts = [(t["role"], t["content"]) for t in record["turns"]] if kind == "conversation" \
        else [("document", record["text"])]
    return key64(kind, exact_key(parts))


class DedupIndex(PipelineStep):
    name = "dedup keys and MinHash signatures"
    type = "🫂 - DEDUP"

    def __init__(self, work: str, config: CleanConfig, naive: bool = False):
        super().__init__()
        self.work, self.config = work, config
        self.naive = naive  # the benchmark's baseline: a fresh MinHash fed one shingle at a time

    def _signatures(self, shingle_sets: list[list[bytes]]) -> list:
        near = self.config.near_dedup
        return [naive_signature(s, near) for s in shingle_sets] if self.naive else signatures(shingle_sets, near)

    def _open(self, relative: str):
        path = Path(self.work) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb")

    def run(self, data, rank: int = 0, world_size: int = 1):
        near, name = self.config.near_dedup, f"{rank:05d}"
        minhash = minhash_config(near)
        band_format = struct.Struct(f"<{minhash.hashes_per_bucket}II")
        order_file, sig_file = self._open(f"order/{name}.bin"), self._open(f"sigs/{name}.bin")
        shingle_file, shingle_ends = self._open(f"shingles/{name}.bin"), self._open(f"shingles/{name}.end")
        id_file, id_ends = self._open(f"record_ids/{name}.bin"), self._open(f"record_ids/{name}.end")
        key_files = {(kind, p): self._open(f"keys/{kind}/{p:03d}/{name}.bin")
                     for kind in ("ids", "exact") for p in range(PARTITIONS)}
        bucket_files = [self._open(f"buckets/bucket_{b:03d}/{name}.minhash.sig") for b in range(minhash.num_buckets)]
        index = signed = shingles_written = id_bytes = 0
        try:
            for batch in batched(data, self.config.chunk_size):
                shingle_sets = [shingles(dedup_texts(doc), near.ngram, near.min_words)
                                if near.enabled and doc.metadata["kind"] != "preference" else [] for doc in batch]
                hashed = iter(self._signatures([s for s in shingle_sets if s]))
                for doc, shingle_set in zip(batch, shingle_sets):
                    kind, record, order = doc.metadata["kind"], doc.metadata["record"], doc.metadata["order"]
                    order_file.write(struct.pack("<Q", order))
                    id_bytes += id_file.write(str(record["id"]).encode("utf-8"))
                    id_ends.write(struct.pack("<Q", id_bytes))
                    keys = [("ids", key64(kind, record["id"]))]
                    if kind != "preference" and self.config.exact_dedup:
                        keys.append(("exact", content_key(kind, record)))
                    for family, key in keys:
                        key_files[family, key % PARTITIONS].write(np.array((key, order, index), KEY_ENTRY).tobytes())
                    signature = next(hashed) if shingle_set else None
                    values = np.zeros(near.num_perm, np.uint32) if signature is None else signature.astype(np.uint32)
                    sig_file.write(values.tobytes())
                    if signature is not None:
                        signed += 1
                        rows = minhash.hashes_per_bucket
                        for band, bucket in enumerate(bucket_files):
                            bucket.write(band_format.pack(*values[band * rows:(band + 1) * rows].tolist(), index))
                        if near.verify:
                            hashes = shingle_hashes(shingle_set)
                            shingle_file.write(hashes.tobytes())
                            shingles_written += len(hashes)
                    shingle_ends.write(struct.pack("<Q", shingles_written))
                    index += 1
                    yield doc
        finally:
            for handle in [order_file, sig_file, shingle_file, shingle_ends, id_file, id_ends, *key_files.values(),
                           *bucket_files]:
                handle.close()
        if signed:  # datatrove sorts (and checks) the bucket files it finds complete
            MinhashDedupSignature(str(Path(self.work) / "buckets"), minhash, skip_existing_sigs=True).run(None, rank, world_size)
