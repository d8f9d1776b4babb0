"""Typed view of the `clean` section of params.yaml (every step switchable, every threshold here)."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

from chatforge.params import require

PII_TYPES = ("email", "url", "phone", "ip")


@dataclass
class PiiConfig:
    enabled: bool = True
    types: list[str] = field(default_factory=lambda: list(PII_TYPES))
    spacy_model: str | None = None  # an installed spaCy model with NER: PERSON names are masked too
    max_replacements: int = 10      # a record with more replacements than this is dropped

    def validate(self, section: str) -> None:
        unknown = sorted(set(self.types) - set(PII_TYPES))
        require(not unknown, f"{section}.types", f"has unknown type {unknown[:1]}; known: {list(PII_TYPES)}")
        require(self.max_replacements >= 0, f"{section}.max_replacements", "must be >= 0")


@dataclass
class QualityConfig:
    enabled: bool = True
    min_turn_chars: int = 1
    max_turn_chars: int = 2000
    min_conversation_chars: int = 5
    max_conversation_chars: int = 20000
    min_document_chars: int = 50
    max_document_chars: int = 100000
    max_repeated_token_run: int = 8
    max_symbol_ratio: float = 0.5
    max_duplicate_line_ratio: float = 0.5
    max_top_ngram_ratio: float = 0.4
    min_words_for_repetition: int = 20
    min_turns_after_truncation: int = 2

    def validate(self, section: str) -> None:
        for name in ("min_turn_chars", "min_conversation_chars", "min_document_chars",
                     "min_words_for_repetition"):
            require(getattr(self, name) >= 0, f"{section}.{name}", "must be >= 0")
        require(self.max_turn_chars > self.min_turn_chars, f"{section}.max_turn_chars", "must exceed min_turn_chars")
        require(self.max_conversation_chars > self.min_conversation_chars, f"{section}.max_conversation_chars",
                "must exceed min_conversation_chars")
        require(self.max_document_chars > self.min_document_chars, f"{section}.max_document_chars",
                "must exceed min_document_chars")
        require(self.max_repeated_token_run >= 2, f"{section}.max_repeated_token_run", "must be >= 2")
        for name in ("max_symbol_ratio", "max_duplicate_line_ratio", "max_top_ngram_ratio"):
            require(0.0 < getattr(self, name) <= 1.0, f"{section}.{name}", "must be in (0, 1]")
        require(self.min_turns_after_truncation >= 2, f"{section}.min_turns_after_truncation",
                "must be >= 2 (a user and an assistant turn)")


@dataclass
class LanguageConfig:
    enabled: bool = True
    allowed: list[str] = field(default_factory=lambda: ["en"])
    min_probability: float = 0.7
    max_chars: int = 2000   # detect on a bounded prefix
    min_chars: int = 60     # below this many letters langdetect is not trusted: `short_text` decides
    short_text: Literal["hint", "detect", "keep", "drop"] = "hint"
    max_foreign_script_share: float = 0.5  # with Latin-script languages allowed: more non-Latin letters → drop


    def validate(self, section: str) -> None:
        require(bool(self.allowed), f"{section}.allowed", "must name at least one language code (e.g. [en])")
        require(0.0 <= self.min_probability <= 1.0, f"{section}.min_probability", "must be in [0, 1]")
        require(self.max_chars > 0, f"{section}.max_chars", "must be > 0")
        require(0 <= self.min_chars <= self.max_chars, f"{section}.min_chars", "must be in [0, max_chars]")
        require(0.0 <= self.max_foreign_script_share <= 1.0, f"{section}.max_foreign_script_share",
                "must be in [0, 1] (1.0: off)")


@dataclass
class NearDedupConfig:
    enabled: bool = True
    num_perm: int = 128
    ngram: int = 3
    threshold: float = 0.55
    min_words: int = 15   # shorter records get exact dedup only
    seed: int = 1
    max_candidates: int = 100  # per record and LSH bucket: earlier records compared (bounds huge buckets)
    verify: bool = True   # a MinHash match counts only when the exact shingle Jaccard reaches the threshold too

    def validate(self, section: str) -> None:
        require(self.num_perm >= 2, f"{section}.num_perm", "must be >= 2 (128 is typical)")
        require(self.ngram >= 1, f"{section}.ngram", "must be >= 1")
        require(self.min_words >= 0, f"{section}.min_words", "must be >= 0")
        require(0.0 < self.threshold < 1.0, f"{section}.threshold", "must be in (0, 1), e.g. 0.7")
        require(self.max_candidates >= 1, f"{section}.max_candidates", "must be >= 1")

    def bands_rows(self) -> tuple[int, int]:
        """LSH bands × rows datasketch picks for threshold and num_perm (datatrove: num_buckets ×
        hashes_per_bucket), so both engines see the same candidates."""
        return _lsh_bands_rows(self.threshold, self.num_perm)


@functools.lru_cache  # datasketch integrates false positive/negative areas numerically: ~0.1 s a call
def _lsh_bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


@dataclass
class SplitConfig:
    train: float = 0.9
    val: float = 0.05
    test: float = 0.05
    # prompt: conversations opening with the same user turn share a split, so val/test never ask a
    # question that train answers (docs/cleaning.md); id: each record by its own id. Documents: by id.
    by: Literal["prompt", "id"] = "prompt"

    def validate(self, section: str) -> None:
        for name, value in self.fractions().items():
            require(0.0 <= value <= 1.0, f"{section}.{name}", "must be in [0, 1]")
        require(abs(sum(self.fractions().values()) - 1.0) < 1e-6, section, "fractions must sum to 1")

    def fractions(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def key(self, record: dict, kind: str) -> str:
        """What the split hashes: the casefolded opening user turn, or the id."""
        if self.by == "prompt" and kind == "conversation":
            opening = next((t["content"] for t in record["turns"] if t["role"] == "user"), None)
            if opening is not None:
                return "prompt:" + " ".join(opening.casefold().split())
        return record["id"]


# Executor arguments the stage sets itself; the rest of `clean.slurm` / `clean.ray` is passed through.
SET_BY_STAGE = {"pipeline", "tasks", "workers", "logging_dir", "depends", "skip_completed"}


def check_executor_options(options: dict, executor: str, key: str) -> None:
    """Unknown or stage-owned keys of `clean.slurm` / `clean.ray` stop the stage with one line (checked
    against datatrove's executor signature, so a typo fails here, not on the cluster)."""
    from datatrove.executor import RayPipelineExecutor, SlurmPipelineExecutor

    cls = {"slurm": SlurmPipelineExecutor, "ray": RayPipelineExecutor}[executor]
    known = set(inspect.signature(cls.__init__).parameters) - SET_BY_STAGE - {"self"}
    unknown = sorted(set(options) - known)
    require(not unknown, f"{key}.{unknown[0]}" if unknown else key,
            f"is not a {cls.__name__} option; known: {', '.join(sorted(known))}")
    if executor == "slurm":
        missing = [name for name in ("partition", "time") if name not in options]
        require(not missing, f"{key}", f"needs {missing} for SlurmPipelineExecutor (e.g. partition: cpu, time: '4:00:00')")


@dataclass
class CleanConfig:
    executor: Literal["local", "slurm", "ray"] = "local"
    tasks: int = 2          # datatrove tasks for the per-record steps; results never depend on it
    workers: int = 2        # tasks run at once on this machine (local executor)
    chunk_size: int = 256   # lines per work unit when there are fewer shards than tasks; MinHash batch size
    work_dir: str | None = None   # the engine's shards, signatures and logs (default: a temp folder); removed after
    slurm: dict[str, Any] = field(default_factory=dict)   # SlurmPipelineExecutor options (partition, time, ...)
    ray: dict[str, Any] = field(default_factory=dict)     # RayPipelineExecutor options (cpus_per_task, ...)
    structure: bool = True
    normalize: bool = True
    pii: PiiConfig = field(default_factory=PiiConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    exact_dedup: bool = True
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def validate(self, section: str) -> None:
        require(self.tasks >= 1, f"{section}.tasks", "must be >= 1")
        require(self.workers >= 1, f"{section}.workers", "must be >= 1")
        require(self.chunk_size >= 1, f"{section}.chunk_size", "must be >= 1")
        if self.executor != "local":
            check_executor_options(getattr(self, self.executor), self.executor, f"{section}.{self.executor}")
