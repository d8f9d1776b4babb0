"""Dedup keys: exact (SHA-256 of the normalized, casefolded record) and near (MinHash signatures of shingles).

Shingles are word n-grams taken inside each turn (a turn shorter than n words is one shingle), so
reordered turns look identical and turn boundaries add no noise. A record with fewer than
max(n, `min_words`) words gets exact dedup only: two empty MinHashes collide in LSH, and on a short
dialogue one typo moves word-shingle Jaccard as far as a different answer does ("Hi, how is it going? /
Good" vs "… / Fine"), so near-dup decisions there would be guesses (measured: tests/test_cleaning.py).
"""
from __future__ import annotations

import hashlib
import re

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


def shingle_hashes(shingle_set: list[bytes]) -> np.ndarray:
    """64-bit hashes of a shingle set, sorted: what the exact Jaccard check compares (no collision in
    practice at 64 bits; MinHash's 32-bit values are only an estimate)."""
    return np.array(sorted({int.from_bytes(hashlib.blake2b(shingle, digest_size=8).digest(), "little")
                            for shingle in shingle_set}), dtype=np.uint64)


def jaccard(first: np.ndarray, second: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted, unique hash arrays."""
    shared = len(np.intersect1d(first, second, assume_unique=True))
    return shared / max(len(first) + len(second) - shared, 1)


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
