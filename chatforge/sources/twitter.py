"""Tweets as JSONL ({"id", "text" or "full_text", "in_reply_to_status_id"}): reply chains.

Handles become `@user` and links `<url>` (they carry no meaning a model can learn, and they are
personal data); the run of handles a reply opens with (its addressees) is removed. HTML entities in
the API's text (&amp; &lt; &gt;) are unescaped. A tweet whose parent is not in the files starts a chain
(crawls are partial). Each root gives ONE chain following the reply with the longest chain below it
(see common.best_chains), so no tweet appears in two conversations; chains of fewer than `min_turns`
tweets are counted and dropped.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Iterator

from chatforge.conversation import alternate, conversation
from chatforge.files import SkipLog, iter_jsonl
from chatforge.params import require
from chatforge.sources.common import Item, SourceConfig, best_chains, require_paths, resolve_paths, subtree_depths

HANDLE = re.compile(r"(?<![\w@])@\w{1,15}\b")
URL = re.compile(r"\bhttps?://\S+|\bwww\.\S+", re.IGNORECASE)
LEADING_HANDLES = re.compile(r"^(?:@user\s+)+")


@dataclass
class Config(SourceConfig):
    path: str | list[str] = ""  # tweet JSONL file(s) or globs
    min_turns: int = 2
    strip_reply_handles: bool = True  # drop the @handles a reply opens with

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths(self.path, f"{section}.path")
        require(self.min_turns >= 2, f"{section}.min_turns", f"={self.min_turns}: must be at least 2")


def normalize_tweet(text: str, strip_reply_handles: bool = True) -> str:
    text = URL.sub("<url>", HANDLE.sub("@user", html.unescape(text)))
    if strip_reply_handles:
        text = LEADING_HANDLES.sub("", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def _tweet_id(value) -> str | None:
    """Ids arrive as numbers or strings (id_str); both become the same key."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        return None
    return str(value)


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    tweets: dict[str, tuple[str, str | None, str]] = {}  # id → (text, parent id, where)
    for path in resolve_paths(config.path):
        for lineno, obj in iter_jsonl(path, skips):
            where = f"{path}:{lineno}"
            tweet_id = _tweet_id(obj.get("id_str", obj.get("id")))
            parent_raw = obj.get("in_reply_to_status_id_str", obj.get("in_reply_to_status_id"))
            parent = _tweet_id(parent_raw)
            text = obj.get("full_text", obj.get("text"))
            if tweet_id is None or (parent_raw is not None and parent is None):
                skips.skip("bad_field", where, "id and in_reply_to_status_id must be numbers or strings")
            elif not isinstance(text, str):
                skips.skip("non_string_content", where, f"text is {type(text).__name__}")
            elif not normalize_tweet(text, config.strip_reply_handles):
                skips.skip("empty_text", where, "nothing left after removing handles and links")
            elif tweet_id in tweets:
                skips.skip("duplicate_id", where, f"tweet {tweet_id} seen at {tweets[tweet_id][2]}")
            else:
                tweets[tweet_id] = (normalize_tweet(text, config.strip_reply_handles), parent, where)
    def parent_of(tweet_id: str) -> str | None:
        return tweets[tweet_id][1]

    depth = subtree_depths(tweets, parent_of)
    order = {tweet_id: index for index, tweet_id in enumerate(tweets)}
    # The reply with the longest chain below it; on a tie, the earliest in the files.
    for chain in best_chains(tweets, parent_of, lambda tweet_id: (depth[tweet_id], -order[tweet_id])):
        where = tweets[chain[0]][2]
        if len(chain) < config.min_turns:
            skips.skip("too_few_turns", where, f"{len(chain)} tweet(s), min_turns={config.min_turns}")
            continue
        yield where, conversation(f"{config.name}:{chain[0]}", config.name,
                                  alternate(tweets[t][0] for t in chain), {"tweet_ids": chain})
