"""chatterbot-corpus YAML: `conversations:` is a list of exchanges, each a list of lines.

Lines alternate user/assistant, user first. Scalars are kept exactly as written (the YAML node's
text, not its resolved value), so `- 3.10` stays "3.10" and `- yes` stays "yes" instead of
becoming 3.1 or True; nested lists or mappings as lines are skipped as `non_string_turn`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from chatforge.conversation import alternate, conversation
from chatforge.files import SkipLog
from chatforge.params import require
from chatforge.sources.common import (
    Item, SourceConfig, in_subfolders, installed_package, read_utf8, require_subfolders,
)

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NULL_TAG = "tag:yaml.org,2002:null"


def package_data_dir(section: str = "source") -> Path:
    return Path(installed_package("chatterbot_corpus.corpus", "chatterbot-corpus", section).DATA_DIRECTORY)


@dataclass
class Config(SourceConfig):
    languages: str | list[str] = "all"  # "all", or folder names of the corpus: [english, spanish]
    path: str | None = None  # a folder of chatterbot-format YAML; default: the installed package's data

    def validate(self, section: str) -> None:
        super().validate(section)
        root = self.root(section)
        require(root.is_dir(), f"{section}.path", f"={str(root)!r} is not a folder of chatterbot YAML files")
        require_subfolders(root, self.languages, f"{section}.languages", "languages")

    def root(self, section: str = "source") -> Path:
        return Path(self.path) if self.path else package_data_dir(section)


def corpus_files(config: Config) -> list[Path]:
    root = config.root()
    return in_subfolders(sorted(root.rglob("*.yml")) + sorted(root.rglob("*.yaml")), root, config.languages)


def _mapping_get(node: yaml.Node, key: str) -> yaml.Node | None:
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return value_node
    return None


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    root = config.root()
    for path in corpus_files(config):
        relative = path.relative_to(root).with_suffix("")
        language = relative.parts[0] if len(relative.parts) > 1 else None
        text = read_utf8(path, skips)
        if text is None:
            continue
        try:
            document = yaml.compose(text, Loader=YAML_LOADER)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            skips.skip("bad_yaml", f"{path}:{mark.line + 1}" if mark else str(path), getattr(error, "problem", ""))
            continue
        exchanges = _mapping_get(document, "conversations") if isinstance(document, yaml.MappingNode) else None
        if not isinstance(exchanges, yaml.SequenceNode):
            skips.skip("no_conversations", str(path), "expected a mapping with a `conversations:` list")
            continue
        categories = _mapping_get(document, "categories")
        meta = {"language": language, "file": relative.as_posix()}
        if isinstance(categories, yaml.SequenceNode):
            meta["categories"] = [c.value for c in categories.value if isinstance(c, yaml.ScalarNode)]
        for index, exchange in enumerate(exchanges.value):
            where = f"{path}:{exchange.start_mark.line + 1}"
            if not isinstance(exchange, yaml.SequenceNode):
                skips.skip("not_a_list", where, "each conversation must be a list of lines")
                continue
            if not all(isinstance(line, yaml.ScalarNode) for line in exchange.value):
                skips.skip("non_string_turn", where, "a line is a list or mapping, not text")
                continue
            if len(exchange.value) < 2:
                skips.skip("too_few_turns", where, "a conversation needs a prompt and a reply")
                continue
            texts = ["" if line.tag == NULL_TAG else line.value for line in exchange.value]
            yield where, conversation(f"{config.name}:{relative.as_posix()}:{index}", config.name,
                                      alternate(texts), meta)
