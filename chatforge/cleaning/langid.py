"""Language identification with langdetect (seeded, so deterministic), with a policy for short text.

langdetect is unreliable on short text: on the chatterbot English corpus it rejects about 1 in 40 English
dialogues ("Hi, how is it going? / Okay" → tl), nearly all under ~60 letters, and code blocks confuse it.
So detection runs on the prose (fenced code removed) of a bounded prefix, and text with fewer than
`min_chars` letters is decided by `short_text`:
  hint   – the source's language hint `meta.language` (ISO 639-1) decides; without a hint, detect anyway
  detect – detect anyway;  keep – keep;  drop – drop.
Each outcome is a counted decision (`detected`, `hint`, `short_kept`, …) or drop reason.

langdetect costs ~3 ms a text (its inner loop runs vectorized here, with the same results: see
langdetect_vector.py), so when every allowed language is written in Latin script, a text whose
letters are mostly in other scripts (CJK, Cyrillic, Arabic, Indic …) is dropped as `foreign_script`
without it (`max_foreign_script_share`; 1.0 turns this off).
A hint is an ISO 639-1 code as langdetect writes it (`en`, `zh-cn`) or an English language name
(`english`, as the chatterbot source writes it).
"""
from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass

from chatforge.cleaning.config import LanguageConfig
from chatforge.cleaning.normalize import without_code


# langdetect's languages written in Latin script.
LATIN_SCRIPT = frozenset("af ca cs cy da de en es et fi fr hr hu id it lt lv nl no pl pt ro sk sl so sq sv sw tl tr vi"
                         .split())
# English names (as corpora name their folders) of langdetect's languages.
LANGUAGE_NAMES = {
    "arabic": "ar", "bengali": "bn", "chinese": "zh-cn", "traditionalchinese": "zh-tw", "dutch": "nl",
    "english": "en", "french": "fr", "german": "de", "hebrew": "he", "hindi": "hi", "indonesian": "id",
    "italian": "it", "japanese": "ja", "korean": "ko", "marathi": "mr", "persian": "fa", "polish": "pl",
    "portuguese": "pt", "russian": "ru", "spanish": "es", "swedish": "sv", "tamil": "ta", "telugu": "te",
    "thai": "th", "turkish": "tr", "ukrainian": "uk", "urdu": "ur", "vietnamese": "vi",
}


def language_code(hint: str) -> str:
    hint = hint.strip().lower()
    return LANGUAGE_NAMES.get(hint, hint)


def foreign_script_share(text: str) -> float:
    """Share of letters that are not Latin script."""
    letters = [char for char in text if char.isalpha()]
    if not letters:
        return 0.0
    return sum(not unicodedata.name(char, "").startswith("LATIN") for char in letters) / len(letters)


def load_language_profiles() -> None:
    """Seed langdetect and load its language profiles now (before worker processes fork)."""
    from langdetect import DetectorFactory

    from chatforge.cleaning.langdetect_vector import load_profiles

    DetectorFactory.seed = 0  # without it results vary from run to run
    load_profiles()


def detection_text(text: str, max_chars: int) -> str:
    """The prose to detect on: fenced code removed, bounded to `max_chars`."""
    return without_code(text)[:max_chars]


@functools.lru_cache(maxsize=65536)  # corpora repeat texts; a seeded detection of the same text is the same
def detect(text: str, vectorized: bool = True) -> tuple[str, float] | None:
    """(language, probability) of the most likely language, or None when langdetect finds no features
    (digits, emoji, punctuation only). `vectorized=False` runs langdetect's own loop (the benchmark's baseline)."""
    import langdetect
    from langdetect.lang_detect_exception import LangDetectException

    from chatforge.cleaning import langdetect_vector

    load_language_profiles()
    try:
        best = (langdetect_vector if vectorized else langdetect).detect_langs(text)[0]
    except LangDetectException:
        return None
    return best.lang, best.prob


@dataclass
class LanguageDecision:
    language: str | None  # detected or hinted language; None when unknown
    keep: bool
    outcome: str          # how it was decided (kept) or the drop reason


def _letters(text: str) -> int:
    return sum(char.isalpha() for char in text)


def decide(text: str, hint: str | None, config: LanguageConfig, naive: bool = False) -> LanguageDecision:
    """Keep or drop a text by language. `naive` always detects, on the whole text (the benchmark's baseline)."""
    prose = text if naive else detection_text(text, config.max_chars)
    allowed = {language_code(name) for name in config.allowed}
    short = _letters(prose) < config.min_chars
    policy = "detect" if naive or not short else config.short_text
    if policy == "hint" and isinstance(hint, str) and hint.strip():
        language = language_code(hint)
        return LanguageDecision(language, language in allowed, "hint" if language in allowed else "hint_not_allowed")
    if policy == "keep":
        return LanguageDecision(None, True, "short_kept")
    if policy == "drop":
        return LanguageDecision(None, False, "short_text")
    if not naive and allowed <= LATIN_SCRIPT and foreign_script_share(prose) > config.max_foreign_script_share:
        return LanguageDecision(None, False, "foreign_script")
    detected = detect.__wrapped__(prose, vectorized=False) if naive else detect(prose)  # the baseline caches nothing
    if detected is None:
        return LanguageDecision(None, False, "undetectable")
    language, probability = detected
    if language not in allowed:
        return LanguageDecision(language, False, "not_allowed")
    if probability < config.min_probability:
        return LanguageDecision(language, False, "low_probability")
    return LanguageDecision(language, True, "detected_short" if short else "detected")
