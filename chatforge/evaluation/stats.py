"""Small statistics used by evaluation and human evaluation."""
from __future__ import annotations

import math
from typing import Iterable


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default); (0, 1) when trials == 0."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # exact ends at 0 and n successes (the formula leaves a rounding crumb there)
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == trials else centre + half)


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all word n-grams across the texts (0 when there are none)."""
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Tokenizer-independent loss: nats over the text converted to bits, per UTF-8 byte of that text."""
    return total_nats / math.log(2) / total_bytes if total_bytes else float("nan")
