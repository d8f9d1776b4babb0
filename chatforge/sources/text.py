"""Plain UTF-8 text files → documents for pretraining.

A file is cut into chunks of whole paragraphs (blank-line separated) of at most `max_chars`: a book
as one record would defeat what works per record downstream — near-dedup (one MinHash for a whole
book), the language check (on a bounded prefix), the quality bounds, and the split by id (a whole
book in one split). A paragraph longer than `max_chars` is cut at line ends, a line at `max_chars`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from chatforge.conversation import document
from chatforge.files import SkipLog
from chatforge.params import require
from chatforge.sources.common import Item, SourceConfig, read_utf8, require_paths, resolve_paths


@dataclass
class Config(SourceConfig):
    path: str | list[str] = ""  # text file(s) or globs
    max_chars: int = 4000  # about a page

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths(self.path, f"{section}.path")
        require(self.max_chars >= 100, f"{section}.max_chars", f"={self.max_chars}: must be at least 100")


def pack(pieces: Iterable[tuple[int, str]], max_chars: int, separator: str) -> Iterator[tuple[int, str]]:
    """Join consecutive (line, text) pieces with `separator` into chunks of at most max_chars."""
    chunk: list[str] = []
    start, size = 0, 0
    for line, piece in pieces:
        if chunk and size + len(separator) + len(piece) > max_chars:
            yield start, separator.join(chunk)
            chunk = []
        if not chunk:
            start, size = line, -len(separator)
        chunk.append(piece)
        size += len(separator) + len(piece)
    if chunk:
        yield start, separator.join(chunk)


def paragraphs(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, paragraph) for each run of non-blank lines."""
    start, lines = 0, []
    # split("\n"), not splitlines(): that also splits on \x0c, \x1c, \x85 … inside a line.
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if line.strip():
            start = start if lines else number
            lines.append(line.rstrip())
        elif lines:
            yield start, "\n".join(lines)
            lines = []
    if lines:
        yield start, "\n".join(lines)


def fitted(paragraph_start: int, paragraph: str, max_chars: int) -> Iterator[tuple[int, str]]:
    """A paragraph as pieces of at most max_chars: itself, else its lines packed, long lines cut."""
    if len(paragraph) <= max_chars:
        yield paragraph_start, paragraph
        return
    lines = ((paragraph_start + offset, line[i:i + max_chars])
             for offset, line in enumerate(paragraph.split("\n")) for i in range(0, len(line), max_chars))
    yield from pack(lines, max_chars, "\n")


def chunks(text: str, max_chars: int) -> Iterator[tuple[int, str]]:
    pieces = (piece for start, paragraph in paragraphs(text) for piece in fitted(start, paragraph, max_chars))
    return pack(pieces, max_chars, "\n\n")


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    for path in resolve_paths(config.path):
        text = read_utf8(path, skips)
        if text is None:
            continue
        if not text.strip():
            skips.skip("empty_text", str(path), "the file has no text")
            continue
        for index, (line, chunk) in enumerate(chunks(text, config.max_chars)):
            yield f"{path}:{line}", document(f"{config.name}:{path}:{index}", config.name, chunk,
                                             {"file": str(path), "line": line, "chunk": index})
