"""Source formats for the collect stage: one module per `type`, each with a `Config` and a `load`.

A source module defines
- `Config`: a dataclass subclassing `common.SourceConfig` with the source's options (params.yaml keys);
- `load(config, skips) -> Iterator[(where, record)]`: records in the schema of chatforge.conversation
  (conversations, documents or preferences), ids prefixed with the source name; malformed input is
  counted in `skips` (a SkipLog) with its file:line and not yielded.
"""
from __future__ import annotations

import importlib
from types import ModuleType

SOURCE_TYPES = {
    "chatterbot": "chatforge.sources.chatterbot",
    "jsonl": "chatforge.sources.jsonl",
    "reddit": "chatforge.sources.reddit",
    "stackexchange": "chatforge.sources.stackexchange",
    "twitter": "chatforge.sources.twitter",
    "text": "chatforge.sources.text",
    "cornell": "chatforge.sources.cornell",
    "hh": "chatforge.sources.hh",
    "oasst": "chatforge.sources.oasst",
    "hf": "chatforge.sources.hf",
    "aiml": "chatforge.sources.aiml",
}


def source_module(type_name: str) -> ModuleType:
    """The module of a source type (imported on demand: `hf` pulls in `datasets`)."""
    return importlib.import_module(SOURCE_TYPES[type_name])
