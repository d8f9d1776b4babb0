"""The per-record clean steps as datatrove filters: each keeps a record or drops it with a named reason
(`stage/reason`, counted in reports/clean.json); dropped records go to the step's exclusion writer.

The rules live in normalize.py, pii.py, quality.py and langid.py; these classes only apply them to our
three record kinds. Counts that the report takes from kept records (PII replacements, truncations,
language) travel in the Document's metadata.
"""
from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.langid import decide, load_language_profiles
from chatforge.cleaning.normalize import normalize_text
from chatforge.cleaning.pii import PiiMasker
from chatforge.cleaning.quality import check_text, filter_conversation
from chatforge.cleaning.records import set_record
from chatforge.conversation import (
    InvalidRecord, check_conversation, check_document, check_preference, check_turns,
)

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def _contents(kind: str, record: dict) -> list[str]:
    """Every text of a record, in a fixed order (turn contents; a document's text)."""
    if kind == "conversation":
        return [t["content"] for t in record["turns"]]
    if kind == "document":
        return [record["text"]]
    return [t["content"] for name in PREFERENCE_FIELDS for t in record[name]]


def _with_contents(kind: str, record: dict, contents: list[str]) -> dict:
    """`record` with its texts replaced, in `_contents` order."""
    if kind == "document":
        return {**record, "text": contents[0]}
    texts = iter(contents)
    fields = ("turns",) if kind == "conversation" else PREFERENCE_FIELDS
    return {**record, **{name: [{**t, "content": next(texts)} for t in record[name]] for name in fields}}


class CleanStep(BaseFilter):
    """A filter over our records: `check` returns None to keep, or (reason, detail) to drop as `stage/reason`."""

    stage = ""

    def __init__(self, config: CleanConfig, exclusion_writer: DiskWriter | None = None):
        # in batches, datatrove times each batch rather than each record (its bookkeeping was ~5% of the stage)
        super().__init__(exclusion_writer, batch_size=config.chunk_size)
        self.config = config

    def check(self, doc: Document, kind: str, record: dict) -> tuple[str, str] | None:
        raise NotImplementedError

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        return [self.filter(doc) for doc in batch]

    def update_doc_stats(self, doc: Document) -> None:
        """No per-record length statistics at every step: reports/clean.json has the counts that matter."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        dropped = self.check(doc, doc.metadata["kind"], doc.metadata["record"])
        if dropped is None:
            return True
        reason, detail = dropped
        doc.metadata["drop"] = {"stage": self.stage, "reason": reason, "detail": detail}
        return False, f"{self.stage}/{reason}"


class StructureStep(CleanStep):
    """Schema checks (`clean.structure`); off, only what later steps need is checked (turns, string texts)."""

    name = "structure"
    stage = "structure"

    def check(self, doc, kind, record):
        full = self.config.structure
        try:
            if kind == "conversation":
                check_conversation(record) if full else check_turns(record.get("turns"))
            elif kind == "document":
                if full:
                    check_document(record)
                elif not isinstance(record.get("text"), str):
                    raise InvalidRecord("non_string_content", "text must be a string")
            else:
                check_preference(record) if full else None
                for name in PREFERENCE_FIELDS:
                    check_turns(record.get(name), name)
        except InvalidRecord as error:
            return error.reason, str(error)
        set_record(doc, {**record, "meta": record.get("meta") or {}} if kind != "preference" else record)
        return None


class NormalizeStep(CleanStep):
    name = "normalize"
    stage = "normalize"

    def check(self, doc, kind, record):
        if not self.config.normalize:
            return None
        contents = [normalize_text(text) for text in _contents(kind, record)]
        if kind == "conversation" and not any(content.strip() for content in contents):
            return "empty_text", "every turn is empty"
        set_record(doc, _with_contents(kind, record, contents))
        return None


class PiiStep(CleanStep):
    name = "pii"
    stage = "pii"

    def __init__(self, config: CleanConfig, exclusion_writer: DiskWriter | None = None):
        super().__init__(config, exclusion_writer)
        self._masker = None  # built in the task's process (spaCy objects do not travel to workers) ...
        if config.pii.enabled and config.pii.types:
            import spacy.matcher  # noqa: F401  ... but spaCy is imported here, once: forked tasks inherit it (~3 s each)

    @property
    def masker(self) -> PiiMasker:
        if self._masker is None:
            self._masker = PiiMasker(self.config.pii.types, self.config.pii.spacy_model)
        return self._masker

    def check(self, doc, kind, record):
        pii = self.config.pii
        if not (pii.enabled and pii.types):
            return None
        masked, counts = self.masker.mask_many(_contents(kind, record))
        total = sum(counts.values())
        if total > pii.max_replacements:
            return "too_many_replacements", f"{total} > {pii.max_replacements}"
        doc.metadata["pii"] = dict(counts)
        set_record(doc, _with_contents(kind, record, masked))
        return None


class PreferenceCheckStep(CleanStep):
    """Normalizing or masking can make a preference's chosen and rejected replies equal."""

    name = "preference check"
    stage = "normalize"

    def check(self, doc, kind, record):
        if kind != "preference":
            return None
        try:
            check_preference(record)
        except InvalidRecord as error:
            return error.reason, str(error)
        return None


class QualityStep(CleanStep):
    """Conversations: a failing turn truncates or drops (quality.py); documents: the text rules."""

    name = "quality"
    stage = "quality"

    def check(self, doc, kind, record):
        quality = self.config.quality
        if not quality.enabled or kind == "preference":
            return None
        if kind == "document":
            reason = check_text(record["text"], quality, quality.min_document_chars, quality.max_document_chars)
            return (f"document_{reason}", "") if reason else None
        kept, reason = filter_conversation(record["turns"], quality)
        if kept is None:
            return reason, ""
        if reason:
            doc.metadata["truncated"] = reason
            set_record(doc, {**record, "turns": kept})
        return None


class LanguageStep(CleanStep):
    name = "language"
    stage = "language"

    def __init__(self, config: CleanConfig, exclusion_writer: DiskWriter | None = None, naive: bool = False):
        super().__init__(config, exclusion_writer)
        self.naive = naive  # the benchmark's baseline: langdetect on every full text
        if config.language.enabled:
            load_language_profiles()  # once, here: forked tasks inherit them (detect() loads them elsewhere)

    def check(self, doc, kind, record):
        if not self.config.language.enabled or kind == "preference":
            return None
        decision = decide(doc.text, record["meta"].get("language"), self.config.language, naive=self.naive)
        doc.metadata["language_outcome"] = decision.outcome
        if not decision.keep:
            return decision.outcome, f"language={decision.language}"
        doc.metadata["language"] = decision.language
        return None


STEPS = (StructureStep, NormalizeStep, PiiStep, PreferenceCheckStep, QualityStep, LanguageStep)
