"""The clean pipeline: per-record steps in worker processes, then dedup and split in input order.

Per record (parallel, `clean.num_proc` processes, chunks of `clean.chunk_size`): structure → normalize →
PII → quality → language → dedup keys (SHA-256 and MinHash hash values). Then, in the main process and in
input order (so results never depend on num_proc): exact dedup → near-duplicate dedup → split.
"""
from __future__ import annotations

import multiprocessing
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.dedup import NearDuplicateIndex, exact_key, naive_signature, shingles, signatures
from chatforge.cleaning.langid import decide, load_language_profiles
from chatforge.cleaning.normalize import normalize_text
from chatforge.cleaning.pii import PiiMasker
from chatforge.cleaning.quality import check_text, filter_conversation
from chatforge.conversation import (
    InvalidRecord, check_conversation, check_document, check_preference, check_turns, conversation_text, split_of,
)

KINDS = ("conversation", "document", "preference")


class Drop(Exception):
    """A record leaves the pipeline at `stage` for `reason` (both counted in the report)."""

    def __init__(self, stage: str, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.stage, self.reason, self.detail = stage, reason, detail

    def __reduce__(self):  # travels back from worker processes
        return Drop, (self.stage, self.reason, self.detail)


@dataclass
class Item:
    kind: str    # conversation | document | preference
    where: str   # file:line, for dropped.jsonl
    record: dict


@dataclass
class Outcome:
    record: dict | None = None        # the cleaned record; None when dropped
    drop: Drop | None = None
    truncated: str | None = None      # the quality reason that cut the conversation short
    pii: Counter = field(default_factory=Counter)
    language: str | None = None
    language_outcome: str | None = None
    key: str | None = None            # exact-dedup key
    signature: np.ndarray | None = None


class RecordCleaner:
    """The per-record steps; one instance per worker process. `naive` is the benchmark's baseline."""

    def __init__(self, config: CleanConfig, naive: bool = False):
        self.config = config
        self.naive = naive
        pii = config.pii
        self.masker = PiiMasker(pii.types, pii.spacy_model) if pii.enabled and pii.types else None
        if config.language.enabled:
            load_language_profiles()

    # -- steps shared by all kinds ---------------------------------------------------------------
    def _normalize(self, texts: list[str]) -> list[str]:
        return [normalize_text(text) for text in texts] if self.config.normalize else texts

    def _mask(self, texts: list[str], outcome: Outcome) -> list[str]:
        if self.masker is None:
            return texts
        masked, counts = self.masker.mask_many(texts)
        total = sum(counts.values())
        if total > self.config.pii.max_replacements:
            raise Drop("pii", "too_many_replacements", f"{total} > {self.config.pii.max_replacements}")
        outcome.pii = counts
        return masked

    def _language(self, text: str, meta: dict, outcome: Outcome) -> None:
        if not self.config.language.enabled:
            return
        decision = decide(text, meta.get("language"), self.config.language, naive=self.naive)
        outcome.language, outcome.language_outcome = decision.language, decision.outcome
        if not decision.keep:
            raise Drop("language", decision.outcome, f"language={decision.language}")

    # -- per kind ----------------------------------------------------------------------------------
    def _conversation(self, record: dict, outcome: Outcome) -> list[str]:
        check_conversation(record) if self.config.structure else check_turns(record.get("turns"))
        contents = self._normalize([t["content"] for t in record["turns"]])
        if not any(content.strip() for content in contents):
            raise Drop("normalize", "empty_text", "every turn is empty")
        contents = self._mask(contents, outcome)
        turns = [{**t, "content": content} for t, content in zip(record["turns"], contents)]
        if self.config.quality.enabled:
            kept, reason = filter_conversation(turns, self.config.quality)
            if kept is None:
                raise Drop("quality", reason)
            if reason:
                outcome.truncated = reason
            turns = kept
        cleaned = {**record, "turns": turns, "meta": record.get("meta") or {}}
        self._language(conversation_text(cleaned), cleaned["meta"], outcome)
        outcome.record = cleaned
        outcome.key = exact_key([(t["role"], t["content"]) for t in turns])
        return [t["content"] for t in turns]

    def _document(self, record: dict, outcome: Outcome) -> list[str]:
        if self.config.structure:
            check_document(record)
        elif not isinstance(record.get("text"), str):
            raise InvalidRecord("non_string_content", "text must be a string")
        [text] = self._mask(self._normalize([record["text"]]), outcome)
        quality = self.config.quality
        if quality.enabled:
            reason = check_text(text, quality, quality.min_document_chars, quality.max_document_chars)
            if reason:
                raise Drop("quality", f"document_{reason}")
        cleaned = {**record, "text": text, "meta": record.get("meta") or {}}
        self._language(text, cleaned["meta"], outcome)
        outcome.record = cleaned
        outcome.key = exact_key([("document", text)])
        return [text]

    def _preference(self, record: dict, outcome: Outcome) -> None:
        check_preference(record) if self.config.structure else None
        fields = ("prompt", "chosen", "rejected")
        for name in fields:
            check_turns(record.get(name), name)
        flat = [t["content"] for name in fields for t in record[name]]
        contents = iter(self._mask(self._normalize(flat), outcome))
        cleaned = {**record, **{name: [{**t, "content": next(contents)} for t in record[name]] for name in fields}}
        try:
            check_preference(cleaned)  # normalizing can make chosen and rejected equal
        except InvalidRecord as error:
            raise Drop("normalize", error.reason, str(error)) from None
        outcome.record = cleaned

    def clean_one(self, item: Item) -> tuple[Outcome, list[str]]:
        """The outcome for one record and the texts to shingle for near-dedup ([] when not deduped)."""
        outcome = Outcome()
        try:
            if item.kind == "preference":
                self._preference(item.record, outcome)
                return outcome, []
            texts = (self._conversation if item.kind == "conversation" else self._document)(item.record, outcome)
            return outcome, texts
        except InvalidRecord as error:
            outcome.drop = Drop("structure", error.reason, str(error))
        except Drop as drop:
            outcome.drop = drop
        outcome.record = None
        return outcome, []

    def clean_chunk(self, items: list[Item]) -> list[Outcome]:
        results = [self.clean_one(item) for item in items]
        near = self.config.near_dedup
        if near.enabled:
            shingle_sets = [shingles(texts, near.ngram, near.min_words) for _, texts in results]
            if self.naive:
                hashed = [naive_signature(s, near) for s in shingle_sets]
            else:
                hashed = signatures(shingle_sets, near)
            for (outcome, _), signature in zip(results, hashed):
                outcome.signature = signature
        return [outcome for outcome, _ in results]


# -- worker processes --------------------------------------------------------------------------------
_WORKER: RecordCleaner | None = None  # built once in the parent; forked workers inherit it ready to use


def _clean_chunk(items: list[Item]) -> list[Outcome]:
    return _WORKER.clean_chunk(items)


def _chunks(items: list[Item], size: int) -> list[list[Item]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def clean_outcomes(items: list[Item], config: CleanConfig, on_chunk: Callable[[int], None] = lambda n: None,
                   naive: bool = False) -> Iterable[Outcome]:
    """Outcomes in input order, computed in `config.num_proc` processes (1: in this process)."""
    global _WORKER
    chunks = _chunks(items, config.chunk_size)
    cleaner = RecordCleaner(config, naive)
    if config.num_proc == 1 or len(chunks) == 1:
        for chunk in chunks:
            yield from cleaner.clean_chunk(chunk)
            on_chunk(len(chunk))
        return
    _WORKER = cleaner
    with multiprocessing.get_context("fork").Pool(config.num_proc) as pool:
        for chunk, outcomes in zip(chunks, pool.imap(_clean_chunk, chunks)):
            yield from outcomes
            on_chunk(len(chunk))


# -- dedup, split and the report, in input order -----------------------------------------------------
@dataclass
class CleanResult:
    splits: dict[str, dict[str, list[dict]]]   # kind → split → records (preferences: "all")
    dropped: list[dict]
    report: dict


def _dropped_entry(item: Item, stage: str, reason: str, detail: str = "", **extra) -> dict:
    return {"kind": item.kind, "id": item.record.get("id"), "where": item.where, "stage": stage, "reason": reason,
            "detail": detail, **extra, "record": item.record}


def run_clean(items: list[Item], config: CleanConfig, on_chunk: Callable[[int], None] = lambda n: None,
              naive: bool = False) -> CleanResult:
    fractions = config.split.fractions()
    splits = {kind: defaultdict(list) for kind in KINDS}
    dropped: list[dict] = []
    counts_in = Counter(item.kind for item in items)
    drop_counts = {kind: Counter() for kind in KINDS}
    truncated, pii, languages, language_outcomes = Counter(), Counter(), Counter(), Counter()
    exact_seen: dict[tuple[str, str], str] = {}
    ids_seen: set[tuple[str, str]] = set()
    near_index = {kind: NearDuplicateIndex(config.near_dedup) for kind in ("conversation", "document")}
    dedup_counts = Counter()

    def drop(item: Item, stage: str, reason: str, detail: str = "", **extra) -> None:
        drop_counts[item.kind][f"{stage}/{reason}"] += 1
        dropped.append(_dropped_entry(item, stage, reason, detail, **extra))

    for item, outcome in zip(items, clean_outcomes(items, config, on_chunk, naive)):
        if outcome.language_outcome:
            language_outcomes[outcome.language_outcome] += 1
        if outcome.drop:
            drop(item, outcome.drop.stage, outcome.drop.reason, outcome.drop.detail)
            continue
        record = outcome.record
        if (item.kind, record["id"]) in ids_seen:
            drop(item, "structure", "duplicate_id", "another record has this id")
            continue
        ids_seen.add((item.kind, record["id"]))
        if item.kind != "preference":
            if config.exact_dedup:
                original = exact_seen.setdefault((item.kind, outcome.key), record["id"])
                if original != record["id"]:
                    dedup_counts[f"{item.kind}_exact"] += 1
                    drop(item, "exact_dedup", "duplicate", duplicate_of=original)
                    continue
            if config.near_dedup.enabled and outcome.signature is not None:
                original = near_index[item.kind].add(record["id"], outcome.signature)
                if original is not None:
                    dedup_counts[f"{item.kind}_near"] += 1
                    drop(item, "near_dedup", "near_duplicate", duplicate_of=original)
                    continue
        truncated.update([outcome.truncated] if outcome.truncated else [])
        pii.update(outcome.pii)
        if outcome.language:
            languages[outcome.language] += 1
        split = "all" if item.kind == "preference" else split_of(config.split.key(record, item.kind), fractions)
        splits[item.kind][split].append(record)

    report = {
        "input": dict(counts_in),
        "output": {kind: {split: len(records) for split, records in sorted(splits[kind].items())} for kind in KINDS},
        "dropped": {kind: dict(sorted(drop_counts[kind].items())) for kind in KINDS},
        "dropped_total": len(dropped),
        "truncated": {"total": sum(truncated.values()), "by_reason": dict(sorted(truncated.items()))},
        "pii_replacements": {name: pii.get(name, 0) for name in sorted(set(config.pii.types) | set(pii))},
        "language": {"kept": dict(languages.most_common()), "outcomes": dict(sorted(language_outcomes.items()))},
        "dedup": {**dict(sorted(dedup_counts.items())),
                  **{kind: index.report() for kind, index in near_index.items()}},
    }
    return CleanResult({kind: dict(splits[kind]) for kind in KINDS}, dropped, report)
