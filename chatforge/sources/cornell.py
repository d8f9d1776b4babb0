"""Cornell Movie-Dialogs corpus: `movie_lines.txt` + `movie_conversations.txt` (+ titles if present).

Fields are separated by ` +++$+++ `. Each file is decoded as UTF-8 or, failing that, Latin-1 (the
original release is Latin-1), with CRLF or LF line ends. Lines are split on "\\n" only: Latin-1 byte
0x85 decodes to U+0085, which str.splitlines() would treat as a line break. The utterance list
(`['L194', 'L195']`) is read with ast.literal_eval, never eval. Speakers alternate user/assistant.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chatforge.conversation import alternate, conversation
from chatforge.files import SkipLog
from chatforge.sources.common import Item, SourceConfig, require_paths

SEPARATOR = " +++$+++ "
LINES_FILE = "movie_lines.txt"
CONVERSATIONS_FILE = "movie_conversations.txt"
TITLES_FILE = "movie_titles_metadata.txt"


@dataclass
class Config(SourceConfig):
    path: str = ""  # the corpus folder, holding movie_lines.txt and movie_conversations.txt

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths([str(Path(self.path) / LINES_FILE), str(Path(self.path) / CONVERSATIONS_FILE)],
                      f"{section}.path", "Cornell Movie-Dialogs corpus")


def read_lines(path: Path) -> list[str]:
    """The file's lines without line ends, decoded as UTF-8 or else Latin-1 (which decodes any bytes)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [line.removesuffix("\r") for line in text.split("\n")]


def _records(path: Path, fields: int, skips: SkipLog) -> Iterator[tuple[str, list[str]]]:
    """(where, fields) of each non-blank line with at least `fields` fields; others counted."""
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split(SEPARATOR, maxsplit=fields - 1)
        if len(parts) < fields:
            skips.skip("too_few_fields", f"{path}:{number}", f"{len(parts)} of {fields} fields")
            continue
        yield f"{path}:{number}", [part.strip() for part in parts]


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    folder = Path(config.path)
    texts = {line_id: text for _, (line_id, _, _, _, text) in _records(folder / LINES_FILE, 5, skips)}
    titles = {}
    if (folder / TITLES_FILE).exists():
        titles = {movie: (title, year) for _, (movie, title, year, *_) in _records(folder / TITLES_FILE, 6, skips)}
    for where, (_, _, movie, utterances) in _records(folder / CONVERSATIONS_FILE, 4, skips):
        try:
            line_ids = ast.literal_eval(utterances)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            line_ids = None
        if not isinstance(line_ids, list) or not all(isinstance(i, str) for i in line_ids):
            skips.skip("bad_utterance_list", where, f"{utterances[:40]!r} is not a list of line ids")
            continue
        missing = [line_id for line_id in line_ids if line_id not in texts]
        if missing:
            skips.skip("missing_line", where, f"{missing[0]} is not in {LINES_FILE}")
            continue
        if len(line_ids) < 2:
            skips.skip("too_few_turns", where, "a conversation needs a prompt and a reply")
            continue
        meta = {"movie": movie, "line_ids": line_ids}
        if movie in titles:
            meta["title"], meta["year"] = titles[movie]
        yield where, conversation(f"{config.name}:{movie}:{line_ids[0]}", config.name,
                                  alternate(texts[line_id] for line_id in line_ids), meta)
