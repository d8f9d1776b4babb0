"""What every source module shares: the config base, input path checks, reply-tree chains, and JSON(L) reading."""
from __future__ import annotations

import glob
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator

from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog, iter_jsonl, open_text
from chatforge.params import require

# A loader yields (where, record): `where` is "file:line" (or the like) for the skip log.
Item = tuple[str, dict]


@dataclass
class SourceConfig:
    """Options every source has; each source module subclasses it with its own options."""

    type: str
    name: str

    def validate(self, section: str) -> None:
        require(bool(self.name) and ":" not in self.name, f"{section}.name",
                f"={self.name!r}: must be a non-empty name without ':' (it prefixes every record id)")


def as_list(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def resolve_paths(spec: str | list[str]) -> list[Path]:
    """Files named by a path, a glob, or a list of them, in a stable (sorted) order."""
    paths: list[Path] = []
    for pattern in as_list(spec):
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        paths.extend(Path(match) for match in matches)
    return paths


def require_paths(spec: str | list[str], key: str, what: str = "file") -> None:
    """Fail fast, before any source runs: every path exists and every glob matches something."""
    patterns = as_list(spec)
    require(bool(patterns) and all(patterns), key, f"is empty; set it to the {what} to read")
    for pattern in patterns:
        if glob.has_magic(pattern):
            require(bool(glob.glob(pattern, recursive=True)), key, f"glob {pattern!r} matches no file; fix the pattern")
        else:
            require(Path(pattern).exists(), key, f"{pattern!r} does not exist; fix the path or fetch the {what}")


def installed_package(module: str, pip_name: str, section: str):
    """The module of the data package that source `section` reads by default; one clear error when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ChatforgeError(f"params.yaml: {section} reads the {pip_name} package, which is not installed: "
                             f"`pip install -c constraints.txt {pip_name}`, or set {section}.path to a folder "
                             "of its files") from None


def require_subfolders(root: Path, chosen: str | list[str], key: str, what: str) -> None:
    """`chosen` is `all` or a non-empty list of sub-folders of `root` (corpus languages, AIML sets)."""
    if isinstance(chosen, str):
        require(chosen == "all", key, f"={chosen!r}: use `all` or a list of {what}")
        return
    known = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    require(bool(chosen), key, f"is an empty list; use `all` or name {what}")
    for name in chosen:
        require(name in known, key, f"has {name!r}, not in {root}; known: {', '.join(known)}")


def in_subfolders(files: list[Path], root: Path, chosen: str | list[str]) -> list[Path]:
    """The files under the chosen sub-folders of `root` (all of them for `all`)."""
    return files if chosen == "all" else [f for f in files if f.relative_to(root).parts[0] in chosen]


def read_utf8(path: Path, skips: SkipLog) -> str | None:
    """A whole file's text; a file that is not UTF-8 is skipped as `bad_encoding` at its first bad line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        skips.skip("bad_encoding", f"{path}:{line}", "not valid UTF-8")
        return None


def best_chains(nodes: Iterable[Hashable], parent_of: Callable[[Hashable], Hashable | None],
                preference: Callable[[Hashable], tuple]) -> Iterator[list]:
    """Split reply trees into chains, one per root, with no turn used twice.

    A root is a node whose parent is not among `nodes`. From each root the chain follows, at every
    step, the child that ranks highest by `preference` (e.g. score). Taking every root-to-leaf path
    instead would repeat the shared prefix in every branch and fill the corpus with near-duplicates.
    """
    nodes = list(nodes)
    present = set(nodes)
    children: dict = {}
    for node in nodes:
        parent = parent_of(node)
        if parent in present:
            children.setdefault(parent, []).append(node)
    for node in nodes:
        if parent_of(node) in present:
            continue
        chain = [node]
        while chain[-1] in children:
            chain.append(max(children[chain[-1]], key=preference))
        yield chain


def subtree_depths(nodes: Iterable[Hashable], parent_of: Callable[[Hashable], Hashable | None]) -> dict:
    """Height of each node's reply subtree (a leaf is 1), iteratively (threads can be deep)."""
    nodes = list(nodes)
    present = set(nodes)
    children: dict = {}
    for node in nodes:
        if parent_of(node) in present:
            children.setdefault(parent_of(node), []).append(node)
    depth: dict = {}
    for start in nodes:
        stack, on_stack = [start], {start}
        while stack:
            node = stack[-1]
            # `on_stack` guards against reply cycles in corrupt data.
            pending = [child for child in children.get(node, ()) if child not in depth and child not in on_stack]
            if pending:
                stack.extend(pending)
                on_stack.update(pending)
                continue
            stack.pop()
            depth[node] = 1 + max((depth.get(child, 0) for child in children.get(node, ())), default=0)
    return depth


def _first_line(path: Path) -> str:
    """The first non-blank line of a (possibly compressed) text file; '' when there is none."""
    with open_text(path, errors="surrogateescape") as handle:
        return next((line for line in handle if line.strip()), "")


def iter_json_records(path: Path, skips: SkipLog) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSONL file, read line by line; or of a JSON document, read whole: one array of
    objects (Alpaca's and ShareGPT's canonical files), or pretty-printed objects (a `.json` file holding one
    object over many lines, such as a ShareGPT conversation, or several one after another, as `jq` prints them).

    A file is a document when its first non-blank character is `[`, its first non-blank line is a lone `{`, or
    it is named `.json` and its first line is not a whole object; every other file is JSONL, so a dump's memory
    never grows with its size. A document must fit in memory (a few times its size): beyond that, convert it to
    JSONL (`jq -c '.[]' big.json > big.jsonl`). Each record's line is where it starts. An element that is not
    an object is `not_an_object`; broken JSON is one `bad_json` at its line, and the rest of the document is
    skipped with it (the parser cannot find the next element's start)."""
    layout = _layout(path)
    if layout == "lines":
        yield from iter_jsonl(path, skips)
        return
    try:
        with open_text(path) as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        skips.skip("bad_encoding", str(path), f"not valid UTF-8 ({error.reason}); the whole document is skipped")
        return
    yield from _document_records(path, text, in_array=layout == "array", skips=skips)


def _layout(path: Path) -> str:
    """"array", "objects" (pretty-printed objects) or "lines" (JSONL): see iter_json_records."""
    first = _first_line(path).strip()
    if first.startswith("["):
        return "array"
    if first == "{":
        return "objects"
    if first.startswith("{") and path.name.removesuffix(".gz").removesuffix(".zst").endswith(".json"):
        try:
            json.loads(first)
        except ValueError:
            return "objects"
    return "lines"


def _document_records(path: Path, text: str, in_array: bool, skips: SkipLog) -> Iterator[tuple[int, dict]]:
    """The objects of a JSON document: the elements of its one array, or its top-level values one after another."""
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0

    def skip_space(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    def line_at(at: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, at)
        counted_to = at
        return line

    position = skip_space(text.index("[") + 1 if in_array else 0)
    if in_array and position < len(text) and text[position] == "]":
        return
    while in_array or position < len(text):  # an array ends at its `]`; objects at the end of the text
        start = line_at(position)
        try:
            obj, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            skips.skip("bad_json", f"{path}:{start}", f"{error.msg}; the rest of the document is skipped")
            return
        if isinstance(obj, dict):
            yield start, obj
        else:
            skips.skip("not_an_object", f"{path}:{start}", type(obj).__name__)
        position = skip_space(position)
        if not in_array:
            continue
        separator = text[position] if position < len(text) else ""
        if separator == "]":
            return
        if separator != ",":
            skips.skip("bad_json", f"{path}:{line_at(position)}",
                       f"expected ',' or ']' after an array element, found {separator!r}")
            return
        position = skip_space(position + 1)
