"""Text normalization: Unicode NFC, control characters out, whitespace collapsed (newlines kept sensible)."""
from __future__ import annotations

import re
import unicodedata

# Invisible characters that carry no meaning in chat text (zero-width space, BOM, soft hyphen, word joiner).
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\ufeff\u00ad\u2060"))
_SPACES = re.compile(r"[^\S\n]+")          # any whitespace except newline (tabs, NBSP, other Zs)
_BLANK_LINES = re.compile(r"\n{3,}")       # at most one empty line between paragraphs
_CODE_FENCE = re.compile(r"```.*?(?:```|$)", re.DOTALL)


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" and char not in "\n\t"


def normalize_text(text: str) -> str:
    """NFC; CRLF/CR → LF; control and invisible characters removed; runs of spaces → one space;
    spaces around line ends trimmed; at most one blank line in a row; stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_INVISIBLE)
    if any(_is_control(char) for char in text):
        text = "".join(char for char in text if not _is_control(char))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def without_code(text: str) -> str:
    """The prose of a text: fenced code blocks removed (code is legitimately repetitive and symbol-heavy,
    and it confuses language detection)."""
    return _CODE_FENCE.sub(" ", text)
