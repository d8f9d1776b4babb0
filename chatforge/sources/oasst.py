"""OpenAssistant (oasst1, oasst2) exports: ranked reply trees → conversations and preference pairs.

Both export shapes are read, recognised line by line (JSONL, .gz, or one JSON array):
- the message table (`*.messages.jsonl.gz`, the Hub dataset's rows): one message a line, with `message_id`,
  `parent_id` (null for a tree's opening prompt), `role` (prompter | assistant), `text`, `rank`, `lang`,
  `deleted`, `review_result`;
- the tree export (`*.trees.jsonl.gz`): `{"message_tree_id", "prompt": {message, "replies": [message, …]}}`.

People ranked the sibling replies of a message: `rank` 0 is the best. From each tree:
- one conversation along the best-ranked path: from the opening prompt, at every step the best-ranked reply
  (an only reply needs no rank), ending at the last assistant turn;
- preference pairs from the ranks of sibling assistant replies: the prompt is the conversation up to their
  parent, chosen the better-ranked reply. `pairs: all` (default) takes every pair of a ranked set, as
  InstructGPT trained on all K-choose-2 comparisons of a ranking; `adjacent` only neighbours in rank (K-1
  pairs, each a finer distinction). Equal ranks give no pair (`tied_rank`).
Skipped and counted, each with everything below it (`parent_dropped`): `deleted` and `failed_review`
(review_result false) messages, `unranked` replies among ranked siblings, `missing_parent` (the parent is not
in the files). The tree's `lang` is each record's `meta.language`, the clean stage's language hint; `languages`
keeps only trees in those languages (`other_language`), which preference pairs need, since the clean stage
checks the language of conversations, not of pairs.
The whole export is held in memory (oasst2's 135K messages: a few hundred MB).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

from chatforge.conversation import InvalidRecord, conversation, preference, turn
from chatforge.files import SkipLog
from chatforge.params import require
from chatforge.sources.common import Item, SourceConfig, iter_json_records, require_paths, resolve_paths

ROLES = {"prompter": "user", "assistant": "assistant"}
FORMAT = "oasst"  # meta.format of every record: the preferences stage keeps these pairs as their own origin


@dataclass
class Config(SourceConfig):
    path: str | list[str] = ""  # message table and/or tree export file(s) or globs; .gz/.zst are decompressed
    languages: str | list[str] = "all"  # `all`, or the `lang` tags to keep, e.g. [en]
    pairs: Literal["all", "adjacent"] = "all"  # which pairs of a ranked set of replies
    conversations: bool = True  # the best-ranked path of each tree as a conversation
    preferences: bool = True  # pairs from sibling ranks

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths(self.path, f"{section}.path", "export")
        require(self.languages == "all" or (isinstance(self.languages, list) and bool(self.languages)),
                f"{section}.languages", f"={self.languages!r}: use `all` or a list of lang tags, e.g. [en]")
        require(self.conversations or self.preferences, section, "needs conversations or preferences (or both) true")


class Message(NamedTuple):
    id: str
    parent: str | None
    role: str  # ours: user | assistant
    text: str
    rank: int | None
    lang: str | None
    dropped: str | None  # deleted | failed_review | None
    where: str


def _rank(value: Any) -> int | None:
    """Ranks are ints, or floats in the Hub's table (0.0; NaN where there is none)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise InvalidRecord("bad_field", f"rank={value!r}: expected a whole number >= 0 or null")
    return int(value)


def parse_message(obj: dict, parent: str | None, where: str) -> Message:
    message_id, role, text, lang = obj.get("message_id"), obj.get("role"), obj.get("text"), obj.get("lang")
    if not isinstance(message_id, str) or not message_id:
        raise InvalidRecord("bad_field", "message_id must be a non-empty string")
    if role not in ROLES:
        raise InvalidRecord("bad_role", f"role={role!r}, expected prompter or assistant")
    if not isinstance(text, str):
        raise InvalidRecord("non_string_content", f"text is {type(text).__name__}")
    if parent is not None and not isinstance(parent, str):
        raise InvalidRecord("bad_field", "parent_id must be a string or null")
    dropped = "deleted" if obj.get("deleted") is True else "failed_review" if obj.get("review_result") is False else None
    return Message(message_id, parent, ROLES[role], text, _rank(obj.get("rank")),
                   lang if isinstance(lang, str) and lang else None, dropped, where)


def tree_messages(tree: dict, where: str) -> list[Message]:
    """The messages of a tree export line, parents before their replies."""
    messages, stack = [], [(tree["prompt"], None)]
    while stack:
        node, parent = stack.pop()
        if not isinstance(node, dict):
            raise InvalidRecord("bad_field", "a message of the tree is not an object")
        message = parse_message(node, parent, where)
        messages.append(message)
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise InvalidRecord("bad_field", f"replies of {message.id} must be a list")
        stack.extend((reply, message.id) for reply in reversed(replies))
    return messages


def read_messages(paths: list[Path], skips: SkipLog) -> dict[str, Message]:
    """Every message of the files by id, in file order; malformed lines and trees are counted."""
    messages: dict[str, Message] = {}
    for path in paths:
        for lineno, obj in iter_json_records(path, skips):
            where = f"{path}:{lineno}"
            try:
                if isinstance(obj.get("prompt"), dict):
                    parsed = tree_messages(obj, where)
                elif "message_id" in obj:
                    parsed = [parse_message(obj, obj.get("parent_id"), where)]
                else:
                    raise InvalidRecord("unknown_shape", f"keys {sorted(obj)[:6]}: neither a message (message_id) "
                                                         "nor a tree (prompt with replies)")
            except InvalidRecord as error:
                skips.skip(error.reason, where, str(error))
                continue
            for message in parsed:
                if message.id in messages:
                    skips.skip("duplicate_id", where, f"message {message.id} seen at {messages[message.id].where}")
                else:
                    messages[message.id] = message
    return messages


def count_dropped(message: Message, reason: str, replies_of: dict[str, list[Message]], skips: SkipLog) -> None:
    """Count `message` under `reason`, and every message below it as parent_dropped."""
    skips.skip(reason, message.where, message.id)
    below = list(replies_of.get(message.id, []))
    while below:
        reply = below.pop()
        skips.skip("parent_dropped", reply.where, reply.id)
        below.extend(replies_of.get(reply.id, []))


class Tree:
    """One prompt's reply tree, reduced to the replies that count: for each message, its kept replies best first."""

    def __init__(self, root: Message, replies_of: dict[str, list[Message]], skips: SkipLog):
        self.root = root
        self.kept: dict[str, list[Message]] = {}
        stack = [root]
        while stack:
            message = stack.pop()
            alive = []
            for reply in replies_of.get(message.id, []):
                if reply.dropped:
                    count_dropped(reply, reply.dropped, replies_of, skips)
                else:
                    alive.append(reply)
            if len(alive) > 1:  # siblings compete: only ranked ones can be ordered
                for reply in [reply for reply in alive if reply.rank is None]:
                    count_dropped(reply, "unranked", replies_of, skips)
                alive = [reply for reply in alive if reply.rank is not None]
            self.kept[message.id] = sorted(alive, key=lambda reply: reply.rank or 0)
            stack.extend(alive)

    def best_path(self) -> list[Message]:
        """From the prompt, the best-ranked reply at every step, cut after the last assistant turn."""
        path = [self.root]
        while self.kept[path[-1].id]:
            path.append(self.kept[path[-1].id][0])
        while path and path[-1].role != "assistant":
            path.pop()
        return path

    def ranked_sets(self) -> Iterator[tuple[list[Message], list[Message]]]:
        """(conversation up to a user turn, its ranked assistant replies best first) for each such turn."""
        stack = [[self.root]]
        while stack:
            path = stack.pop()
            replies = self.kept[path[-1].id]
            if path[-1].role == "user" and len(replies) > 1:
                yield path, replies
            stack.extend(path + [reply] for reply in reversed(replies))


def ranked_pairs(replies: list[Message], mode: str) -> Iterator[tuple[Message, Message]]:
    """(better, worse) pairs of replies sorted best first: all pairs, or neighbours in rank."""
    return itertools.combinations(replies, 2) if mode == "all" else zip(replies, replies[1:])


def turns(path: list[Message]) -> list[dict]:
    return [turn(message.role, message.text) for message in path]


def tree_records(tree: Tree, config: Config, skips: SkipLog) -> Iterator[Item]:
    root = tree.root
    meta = {"format": FORMAT, "tree": root.id, **({"language": root.lang} if root.lang else {})}
    if config.conversations:
        path = tree.best_path()
        if len(path) < 2:
            skips.skip("too_few_turns", root.where, f"tree {root.id} has no kept assistant reply")
        else:
            yield root.where, conversation(f"{config.name}:{root.id}", config.name, turns(path),
                                           {**meta, "message_ids": [m.id for m in path], "ranks": [m.rank for m in path]})
    if config.preferences:
        for prompt, replies in tree.ranked_sets():
            for better, worse in ranked_pairs(replies, config.pairs):
                if better.rank == worse.rank:
                    skips.skip("tied_rank", worse.where, f"{better.id} and {worse.id} share rank {worse.rank}")
                    continue
                yield worse.where, preference(
                    f"{config.name}:{better.id}>{worse.id}", config.name, turns(prompt), turns([better]),
                    turns([worse]), {**meta, "chosen_rank": better.rank, "rejected_rank": worse.rank})


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    messages = read_messages(resolve_paths(config.path), skips)
    replies_of: dict[str, list[Message]] = {}
    for message in messages.values():
        if message.parent is not None:
            replies_of.setdefault(message.parent, []).append(message)
    allowed = None if config.languages == "all" else {tag.lower() for tag in config.languages}
    for message in messages.values():
        if message.parent is not None:
            if message.parent not in messages:
                count_dropped(message, "missing_parent", replies_of, skips)
            continue
        reason = message.dropped or ("bad_role" if message.role != "user" else None) or (
            "other_language" if allowed is not None and (message.lang or "").lower() not in allowed else None)
        if reason:
            count_dropped(message, reason, replies_of, skips)
        else:
            yield from tree_records(Tree(message, replies_of, skips), config, skips)
