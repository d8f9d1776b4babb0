"""PII masking with spaCy's tokenizer and rule-based Matcher on a blank English pipeline (no model download).

Emails, URLs, phone numbers and IPv4 addresses become `<email>`, `<url>`, `<phone>`, `<ip>`. When a spaCy
model with NER is installed and named in `clean.pii.spacy_model`, PERSON entities become `<person>`.
"""
from __future__ import annotations

import itertools
from collections import Counter

from chatforge.errors import ChatforgeError

# Bare domains count as URLs only with a common top-level domain: `Node.js` or `index.html` are not URLs.
COMMON_TLDS = frozenset(
    "com org net edu gov mil int io co uk de fr es it nl ru cn jp in br au ca us info biz me ai dev app tv eu ch".split()
)
_SCHEMES = ("http://", "https://", "ftp://", "www.")


def _digits(*counts: int) -> dict:
    return {"SHAPE": {"IN": ["d" * n for n in counts]}}


_SEPARATORS = ("-", ".")
_OPTIONAL_SEPARATOR = {"ORTH": {"IN": list(_SEPARATORS)}, "OP": "?"}
_COUNTRY_CODE = {"SHAPE": {"IN": ["+d", "+dd", "+ddd"]}}
# spaCy's tokenizer splits "555-123-4567" and "(555) 123-4567" into digit groups and punctuation.
_PHONE_PATTERNS = [
    # North American: (555) 123-4567, 555-123-4567, 555 123 4567, +1 555 123 4567
    [{**_COUNTRY_CODE, "OP": "?"}, _OPTIONAL_SEPARATOR, {"ORTH": "(", "OP": "?"}, _digits(3), {"ORTH": ")", "OP": "?"},
     _OPTIONAL_SEPARATOR, _digits(3), _OPTIONAL_SEPARATOR, _digits(4)],
    # international with a country code: +44 20 7946 0958, +49-30-1234567
    [_COUNTRY_CODE, _OPTIONAL_SEPARATOR, _digits(1, 2, 3, 4), _OPTIONAL_SEPARATOR, _digits(2, 3, 4),
     _OPTIONAL_SEPARATOR, _digits(2, 3, 4), _OPTIONAL_SEPARATOR, {**_digits(2, 3, 4), "OP": "?"}],
    # one token: 555.123.4567
    [{"SHAPE": {"IN": ["ddd.ddd.dddd", "ddd-ddd-dddd"]}}],
]
# Token shapes of dotted quads (each part 1-3 digits); the octet range is checked after matching.
_IP_SHAPES = [".".join(parts) for parts in itertools.product(["d", "dd", "ddd"], repeat=4)]
_PATTERNS = {
    "email": [[{"LIKE_EMAIL": True}]],
    "url": [[{"LIKE_URL": True}]],
    "phone": _PHONE_PATTERNS,
    "ip": [[{"SHAPE": {"IN": _IP_SHAPES}}]],
}


def _is_url(text: str) -> bool:
    lower = text.lower()
    if lower.startswith(_SCHEMES):
        return True
    host = lower.split("/", 1)[0].split(":", 1)[0].rstrip(".")
    return "." in host and host.rsplit(".", 1)[1] in COMMON_TLDS


def _is_ipv4(text: str) -> bool:
    return all(int(part) <= 255 for part in text.split("."))


_CHECKS = {"url": _is_url, "ip": _is_ipv4}


class PiiMasker:
    """Replaces PII spans by `<type>` placeholders and counts them by type."""

    def __init__(self, types: list[str], spacy_model: str | None = None):
        import spacy
        from spacy.matcher import Matcher

        if spacy_model:
            try:
                self.nlp = spacy.load(spacy_model, enable=["ner"])
            except OSError:
                raise ChatforgeError(
                    f"params.yaml: clean.pii.spacy_model={spacy_model!r} is not installed; install it "
                    f"(python -m spacy download {spacy_model}) or set it to null"
                ) from None
        else:
            self.nlp = spacy.blank("en")
        self.mask_persons = bool(spacy_model)
        self.matcher = Matcher(self.nlp.vocab)
        for name in types:
            self.matcher.add(name, _PATTERNS[name], greedy="LONGEST")

    def _spans(self, doc) -> list:
        from spacy.util import filter_spans

        spans = []
        for match_id, start, end in self.matcher(doc):
            span = doc[start:end]
            while len(span) > 1 and span[-1].text in _SEPARATORS:  # a dangling optional separator
                span = span[:-1]
            while len(span) > 1 and span[0].text in _SEPARATORS:
                span = span[1:]
            label = self.nlp.vocab.strings[match_id]
            if _CHECKS.get(label, bool)(span.text):
                spans.append(doc.char_span(span.start_char, span.end_char, label=label))
        if self.mask_persons:
            spans.extend(ent for ent in doc.ents if ent.label_ == "PERSON")
        return filter_spans(spans)  # overlapping matches: the longest wins

    def mask_many(self, texts: list[str]) -> tuple[list[str], Counter]:
        """Mask every text; returns the masked texts and replacement counts by type."""
        counts: Counter = Counter()
        docs = self.nlp.pipe(texts) if self.mask_persons else (self.nlp.make_doc(text) for text in texts)
        masked = []
        for text, doc in zip(texts, docs):
            pieces, position = [], 0
            for span in sorted(self._spans(doc), key=lambda span: span.start_char):
                label = span.label_.lower()
                pieces += [text[position:span.start_char], f"<{label}>"]
                position = span.end_char
                counts[label] += 1
            masked.append("".join(pieces) + text[position:])
        return masked, counts
