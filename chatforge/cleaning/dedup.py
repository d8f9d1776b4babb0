"""Exact dedup (SHA-256 of the normalized, casefolded record) and near-duplicate dedup (MinHash + LSH).

Shingles are word n-grams taken inside each turn (a turn shorter than n words is one shingle), so
reordered turns look identical and turn boundaries add no noise. A record with fewer than
max(n, `min_words`) words gets exact dedup only: two empty MinHashes collide in LSH, and on a short
dialogue one typo moves word-shingle Jaccard as far as a different answer does ("Hi, how is it going? /
Good" vs "… / Fine"), so near-dup decisions there would be guesses (measured: tests/test_cleaning.py).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np

from chatforge.cleaning.config import NearDedupConfig

WORD = re.compile(r"\w+")


def exact_key(parts: list[tuple[str, str]]) -> str:
    """SHA-256 of (role, text) parts, casefolded: equal keys mean the same record up to case."""
    joined = "\x1e".join(f"{role}\x1f{text}" for role, text in parts).casefold()
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def shingles(texts: list[str], n: int, min_words: int = 0) -> list[bytes]:
    """Word n-gram shingles of each text (casefolded); [] when all texts together have fewer than
    max(n, min_words) words."""
    words_per_text = [WORD.findall(text.casefold()) for text in texts]
    if sum(map(len, words_per_text)) < max(n, min_words):
        return []
    found = set()
    for words in words_per_text:
        if len(words) < n:
            if words:
                found.add(" ".join(words))
            continue
        found.update(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return [shingle.encode("utf-8") for shingle in sorted(found)]


def _minhash(config: NearDedupConfig, **kwargs):
    from datasketch import MinHash

    return MinHash(num_perm=config.num_perm, seed=config.seed, **kwargs)


def signatures(shingle_sets: list[list[bytes]], config: NearDedupConfig) -> list[np.ndarray | None]:
    """MinHash hash values per shingle set (None for an empty set), hashed in bulk (`update_batch`)."""
    from datasketch import MinHash

    present = [s for s in shingle_sets if s]
    hashed = iter(MinHash.bulk(present, num_perm=config.num_perm, seed=config.seed))
    return [next(hashed).hashvalues if s else None for s in shingle_sets]


def naive_signature(shingle_set: list[bytes], config: NearDedupConfig) -> np.ndarray | None:
    """The baseline the benchmark compares against: a fresh MinHash fed one shingle at a time."""
    if not shingle_set:
        return None
    minhash = _minhash(config)
    for shingle in shingle_set:
        minhash.update(shingle)
    return minhash.hashvalues


class NearDuplicateIndex:
    """MinHashLSH over the kept records; a candidate counts as a duplicate only when its estimated
    Jaccard similarity reaches the threshold (LSH alone lets some lower pairs through)."""

    def __init__(self, config: NearDedupConfig):
        from datasketch import MinHashLSH

        self.config = config
        self.lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
        self.template = _minhash(config)
        self.order: dict[str, int] = {}
        self.kept: dict = {}
        self.cluster_sizes: Counter = Counter()

    @property
    def bands_rows(self) -> tuple[int, int]:
        return self.lsh.b, self.lsh.r

    def add(self, key: str, hashvalues: np.ndarray) -> str | None:
        """Insert `key` unless it near-duplicates a kept record; then return that record's key."""
        minhash = _minhash(self.config, hashvalues=hashvalues, permutations=self.template.permutations,
                           scheme=self.template.scheme)
        best, best_similarity = None, -1.0
        # highest similarity wins; ties go to the earliest kept record (deterministic)
        for candidate in sorted(self.lsh.query(minhash), key=self.order.__getitem__):
            similarity = minhash.jaccard(self.kept[candidate])
            if similarity >= self.config.threshold and similarity > best_similarity:
                best, best_similarity = candidate, similarity
        if best is not None:
            self.cluster_sizes[best] += 1
            return best
        self.order[key] = len(self.order)
        self.kept[key] = minhash
        self.lsh.insert(key, minhash)
        return None

    def report(self) -> dict:
        bands, rows = self.bands_rows
        return {
            "num_perm": self.config.num_perm, "ngram": self.config.ngram, "threshold": self.config.threshold,
            "min_words": self.config.min_words,
            "lsh_bands": bands, "lsh_rows": rows,
            "clusters": len(self.cluster_sizes),
            "largest_cluster": 1 + max(self.cluster_sizes.values()) if self.cluster_sizes else 0,
        }
