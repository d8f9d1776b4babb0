"""Chat data in the common formats, detected record by record, from JSONL or from one JSON array per file.

- ours:       {"id"?, "turns": [{"role", "content"}], "meta"?}
- OpenAI:     {"messages": [{"role", "content"}]}  (content may be a list of {"type": "text", "text"} parts)
- ShareGPT:   {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
- Alpaca:     {"instruction", "input"?, "output"}  (the input follows the instruction after a blank line)
- preference: {"prompt": str|turns, "chosen": str|turns, "rejected": str|turns}  → preferences
A record in none of these shapes is skipped as `unknown_shape`. Besides JSONL, a file may be one JSON document
(common.iter_json_records): one array (`[{...}, {...}]`, Alpaca's and ShareGPT's canonical files) or
pretty-printed objects (a `.json` file holding one object over many lines, e.g. one ShareGPT conversation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from chatforge.conversation import InvalidRecord, conversation, preference, turn
from chatforge.files import SkipLog
from chatforge.sources.common import Item, SourceConfig, iter_json_records, require_paths, resolve_paths

# ShareGPT speaker names seen in the wild → our roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}


@dataclass
class Config(SourceConfig):
    path: str | list[str] = ""  # file(s) or glob(s); .gz/.zst are decompressed

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths(self.path, f"{section}.path")


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        texts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    raise InvalidRecord("non_string_content", f"{where} is {type(value).__name__}, expected a string")


def message_turns(messages: Any, field: str = "messages") -> list[dict]:
    """Our turns from a list of {role, content} (ours, OpenAI) or {from, value} (ShareGPT) messages."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRecord("no_turns", f"{field} must be a non-empty list")
    turns = []
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise InvalidRecord("bad_turn", f"{where} is not an object")
        if "from" in message and "role" not in message:
            speaker = message["from"]
            role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
            if role is None:
                raise InvalidRecord("bad_role", f"{where}.from={speaker!r}, expected one of {sorted(SHAREGPT_ROLES)}")
            turns.append(turn(role, _content(message.get("value"), f"{where}.value")))
        else:
            turns.append(turn(message.get("role"), _content(message.get("content"), f"{where}.content")))
    return turns


def alpaca_prompt(instruction: Any, input_text: Any) -> str:
    """The user turn of an Alpaca record: as Alpaca's own template lays them out, the instruction, then the
    input (when there is one) after a blank line; the template's `### Instruction:` headings are its prompt
    format, which a chat template replaces."""
    parts = [_content(instruction, "instruction"), _content(input_text or "", "input")]
    return "\n\n".join(part for part in parts if part.strip())


def side_turns(value: Any, field: str, role: str) -> list[dict]:
    """A preference side: a plain string is one turn of `role`, a list is turns."""
    return [turn(role, value)] if isinstance(value, str) else message_turns(value, field)


def parse_line(obj: dict, record_id: str, source: str, meta: dict) -> dict:
    """One JSONL object in any supported shape → a conversation or preference record."""
    if "turns" in obj:
        extra = obj.get("meta", {})
        if not isinstance(extra, dict):
            raise InvalidRecord("bad_meta", "meta must be an object")
        return conversation(record_id, source, message_turns(obj["turns"], "turns"), {**extra, **meta})
    if "messages" in obj:
        return conversation(record_id, source, message_turns(obj["messages"]), {**meta, "format": "openai"})
    if "conversations" in obj:
        return conversation(record_id, source, message_turns(obj["conversations"], "conversations"),
                            {**meta, "format": "sharegpt"})
    if "chosen" in obj and "rejected" in obj and "prompt" in obj:
        return preference(record_id, source, side_turns(obj["prompt"], "prompt", "user"),
                          side_turns(obj["chosen"], "chosen", "assistant"),
                          side_turns(obj["rejected"], "rejected", "assistant"), meta)
    if "instruction" in obj and "output" in obj:
        prompt = alpaca_prompt(obj["instruction"], obj.get("input"))
        return conversation(record_id, source, [turn("user", prompt), turn("assistant", _content(obj["output"], "output"))],
                            {**meta, "format": "alpaca"})
    raise InvalidRecord("unknown_shape", f"keys {sorted(obj)[:6]}: not ours, OpenAI, ShareGPT, Alpaca or preference")


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    for path in resolve_paths(config.path):
        for lineno, obj in iter_json_records(path, skips):
            where = f"{path}:{lineno}"
            own_id = obj.get("id")
            # A record's own id keeps it in the same split wherever the file moves; else file and line.
            record_id = f"{config.name}:{own_id}" if isinstance(own_id, (str, int)) and own_id != "" else f"{config.name}:{where}"
            try:
                yield where, parse_line(obj, record_id, config.name, {"file": str(path), "line": lineno})
            except InvalidRecord as error:
                skips.skip(error.reason, where, str(error))
