"""Quality rules per turn, per conversation and per document (Gopher-style repetition, relaxed for dialogue).

Each check returns the name of the first failed rule, or None. Reasons are counted by name in the report.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

from chatforge.cleaning.config import QualityConfig
from chatforge.cleaning.normalize import without_code

WORD = re.compile(r"\w+")


def _longest_run(words: list[str]) -> int:
    longest = run = 1 if words else 0
    for previous, word in zip(words, words[1:]):
        run = run + 1 if word == previous else 1
        longest = max(longest, run)
    return longest


def symbol_ratio(text: str) -> float:
    """Share of non-space characters that are not letters, digits or combining marks (so punctuation,
    symbols, emoji); marks count as letters because Indic scripts write vowels with them."""
    visible = [char for char in text if not char.isspace()]
    if not visible:
        return 0.0
    return sum(unicodedata.category(char)[0] not in "LNM" for char in visible) / len(visible)


def duplicate_line_ratio(text: str) -> float:
    """Share of characters in lines that repeat an earlier line (Gopher's duplicate-line fraction)."""
    seen, duplicated, total = set(), 0, 0
    for line in (line.strip() for line in text.split("\n")):
        if not line:
            continue
        total += len(line)
        if line in seen:
            duplicated += len(line)
        seen.add(line)
    return duplicated / total if total else 0.0


def top_bigram_ratio(words: list[str]) -> float:
    """Share of word characters covered by the most frequent word 2-gram (Gopher's top n-gram fraction)."""
    if len(words) < 3:
        return 0.0
    (top, count), = Counter(zip(words, words[1:])).most_common(1)
    if count < 2:
        return 0.0
    return count * sum(map(len, top)) / sum(map(len, words))


def check_text(text: str, config: QualityConfig, min_chars: int, max_chars: int) -> str | None:
    """Rules shared by turns and documents: length bounds, then token runs, symbols and repetition on
    the prose (fenced code is exempt)."""
    if len(text) < min_chars:
        return "too_short"
    if len(text) > max_chars:
        return "too_long"
    prose = without_code(text)
    words = WORD.findall(prose.casefold())
    if _longest_run(words) >= config.max_repeated_token_run:
        return "repeated_token_run"
    if symbol_ratio(prose) > config.max_symbol_ratio:
        return "symbol_ratio"
    if len(words) >= config.min_words_for_repetition:
        if duplicate_line_ratio(prose) > config.max_duplicate_line_ratio:
            return "duplicate_lines"
        if top_bigram_ratio(words) > config.max_top_ngram_ratio:
            return "top_ngram_ratio"
    return None


def check_turn(content: str, config: QualityConfig) -> str | None:
    reason = check_text(content, config, config.min_turn_chars, config.max_turn_chars)
    return f"turn_{reason}" if reason else None


def check_turns_total(turns: list[dict], config: QualityConfig) -> str | None:
    chars = sum(len(t["content"]) for t in turns)
    if chars < config.min_conversation_chars:
        return "conversation_too_short"
    if chars > config.max_conversation_chars:
        return "conversation_too_long"
    return None


def filter_conversation(turns: list[dict], config: QualityConfig) -> tuple[list[dict] | None, str | None]:
    """(turns to keep, reason). A failing turn cuts the conversation before it, at the last assistant turn,
    when at least `min_turns_after_truncation` turns remain; otherwise the whole conversation is dropped.

    Returns (turns, None) if all pass, (prefix, reason) if truncated, (None, reason) if dropped.
    """
    for index, item in enumerate(turns):
        reason = check_turn(item["content"], config)
        if reason is None:
            continue
        prefix = turns[:index]
        while prefix and prefix[-1]["role"] != "assistant":
            prefix = prefix[:-1]
        roles = {t["role"] for t in prefix}
        if len(prefix) >= config.min_turns_after_truncation and {"user", "assistant"} <= roles \
                and check_turns_total(prefix, config) is None:
            return prefix, reason
        return None, reason
    reason = check_turns_total(turns, config)
    return (None, reason) if reason else (turns, None)
