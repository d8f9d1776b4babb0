"""Anthropic HH-RLHF: {"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": …} lines (.jsonl/.jsonl.gz).

Each line gives a preference pair — prompt = the turns both transcripts share, chosen/rejected = their
last assistant replies — and, with `chosen_conversations`, the chosen transcript as a conversation
(same id as its pair). Transcripts whose earlier turns differ are skipped as `prompts_differ`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

from chatforge.conversation import InvalidRecord, conversation, preference, turn
from chatforge.files import SkipLog, iter_jsonl
from chatforge.sources.common import Item, SourceConfig, require_paths, resolve_paths

SPEAKER = re.compile(r"\n\n(Human|Assistant):[ ]?")
ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Config(SourceConfig):
    path: str | list[str] = ""  # HH-RLHF file(s) or globs, .jsonl or .jsonl.gz
    chosen_conversations: bool = True  # also emit each chosen transcript as a conversation

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths(self.path, f"{section}.path")


def transcript_turns(text: Any, field: str) -> list[dict]:
    """Turns of a "\\n\\nHuman: …\\n\\nAssistant: …" transcript."""
    if not isinstance(text, str):
        raise InvalidRecord("non_string_content", f"{field} is {type(text).__name__}")
    parts = SPEAKER.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise InvalidRecord("bad_transcript", f"{field} must start with '\\n\\nHuman: '")
    return [turn(ROLES[speaker], content.strip()) for speaker, content in zip(parts[1::2], parts[2::2])]


def parse_pair(obj: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen reply, rejected reply) of one HH line."""
    if "chosen" not in obj or "rejected" not in obj:
        raise InvalidRecord("unknown_shape", f"keys {sorted(obj)[:6]}: expected chosen and rejected")
    chosen, rejected = transcript_turns(obj["chosen"], "chosen"), transcript_turns(obj["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise InvalidRecord("prompts_differ", "chosen and rejected must share all turns but the last assistant reply")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    for path in resolve_paths(config.path):
        for lineno, obj in iter_jsonl(path, skips):
            where = f"{path}:{lineno}"
            try:
                prompt, chosen, rejected = parse_pair(obj)
            except InvalidRecord as error:
                skips.skip(error.reason, where, str(error))
                continue
            record_id = f"{config.name}:{path}:{lineno}"
            meta = {"file": str(path), "line": lineno}
            yield where, preference(record_id, config.name, prompt, chosen, rejected, meta)
            if config.chosen_conversations:
                yield where, conversation(record_id, config.name, prompt + chosen, meta)
