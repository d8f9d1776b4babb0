"""Tweets as JSONL ({"id", "text" or "full_text", "in_reply_to_status_id"}): reply chains.

Ids may be numbers, `*_str` strings or MongoDB's {"$numberLong": "…"}; a long v1.1 tweet's text is taken from
`extended_tweet.full_text` (its `text` is cut at 140 characters).

Handles become `@user` and links `<url>` (they carry no meaning a model can learn, and they are
personal data); the run of handles a reply opens with (its addressees) is removed. HTML entities in
the API's text (&amp; &lt; &gt;) are unescaped. A tweet whose parent is not in the files starts a chain
(crawls are partial). Each root gives ONE chain following the reply with the longest chain below it
(see common.best_chains), so no tweet appears in two conversations; chains of fewer than `min_turns`
tweets are counted and dropped.
Memory is bounded for dumps with `conversation_id` (API v2: the id of the conversation's first
tweet): a first pass files each tweet under it into `buckets` temporary files, a second pass builds
one bucket's chains at a time (sources.buckets). Tweets without it (API v1.1) are filed under the
root their reply links lead to, found out of core too (ReplyRoots: an id → parent table on disk).
"""
from __future__ import annotations

import html
import math
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from chatforge.conversation import alternate, conversation
from chatforge.files import SkipLog, iter_jsonl
from chatforge.params import require
from chatforge.sources.buckets import Buckets, bucket_count
from chatforge.sources.common import Item, SourceConfig, best_chains, require_paths, resolve_paths, subtree_depths

HANDLE = re.compile(r"(?<![\w@])@\w{1,15}\b")
URL = re.compile(r"\bhttps?://\S+|\bwww\.\S+", re.IGNORECASE)
LEADING_HANDLES = re.compile(r"^(?:@user\s+)+")


@dataclass
class Config(SourceConfig):
    path: str | list[str] = ""  # tweet JSONL file(s) or globs
    min_turns: int = 2
    strip_reply_handles: bool = True  # drop the @handles a reply opens with
    buckets: int = 0  # conversations are spread over this many temporary files; 0: one per ~32 MB of input

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths(self.path, f"{section}.path")
        require(self.min_turns >= 2, f"{section}.min_turns", f"={self.min_turns}: must be at least 2")
        require(self.buckets >= 0, f"{section}.buckets", f"={self.buckets}: must be 0 (from the input size) or more")


def normalize_tweet(text: str, strip_reply_handles: bool = True) -> str:
    text = URL.sub("<url>", HANDLE.sub("@user", html.unescape(text)))
    if strip_reply_handles:
        text = LEADING_HANDLES.sub("", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def _tweet_id(value) -> str | None:
    """Ids arrive as numbers, strings (id_str) or MongoDB Extended JSON ({"$numberLong": "…"}, as mongoexport
    writes 64-bit ids); all become the same key."""
    if isinstance(value, dict) and set(value) == {"$numberLong"}:
        value = value["$numberLong"]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        return None
    return str(value)


def _field(obj: dict, name: str):
    """`name_str` when the tweet has it (always a plain string), else `name`."""
    plain = obj.get(f"{name}_str")
    return plain if plain is not None else obj.get(name)


def _full_text(obj: dict):
    """The untruncated text: v1.1 streaming tweets over 140 characters carry a cut `text` and the whole one in
    `extended_tweet.full_text`; the REST API's extended mode writes `full_text`."""
    extended = obj.get("extended_tweet")
    if isinstance(extended, dict) and "full_text" in extended:
        return extended["full_text"]
    return obj.get("full_text", obj.get("text"))


class Tweet(NamedTuple):
    id: str
    text: str
    parent: str | None
    where: str


def _tweets(paths: list[Path], config: Config, skips: SkipLog) -> Iterator[tuple[str | None, Tweet]]:
    """(conversation id or None, tweet) for each usable tweet; malformed ones are counted."""
    for path in paths:
        for lineno, obj in iter_jsonl(path, skips):
            where = f"{path}:{lineno}"
            tweet_id = _tweet_id(_field(obj, "id"))
            parent_raw = _field(obj, "in_reply_to_status_id")
            parent = _tweet_id(parent_raw)
            text = _full_text(obj)
            if tweet_id is None or (parent_raw is not None and parent is None):
                skips.skip("bad_field", where, "id and in_reply_to_status_id must be numbers or strings")
            elif not isinstance(text, str):
                skips.skip("non_string_content", where, f"text is {type(text).__name__}")
            elif not normalize_tweet(text, config.strip_reply_handles):
                skips.skip("empty_text", where, "nothing left after removing handles and links")
            else:
                conversation_id = _tweet_id(_field(obj, "conversation_id"))
                yield conversation_id, Tweet(tweet_id, normalize_tweet(text, config.strip_reply_handles), parent, where)


def reply_roots(parents: dict[str, str | None]) -> dict[str, str]:
    """Each tweet's root: its farthest ancestor among these tweets (in a reply cycle, where the walk met itself)."""
    root: dict[str, str] = {}
    for start in parents:
        path, on_path, node = [], set(), start
        while node in parents and node not in root and node not in on_path:
            path.append(node)
            on_path.add(node)
            node = parents[node]
        top = root[node] if node in root else node if node in on_path else path[-1]
        for tweet_id in path:
            root[tweet_id] = top
    return root


def reply_chains(tweets_in_order: Iterable[Tweet], config: Config, skips: SkipLog) -> Iterator[Item]:
    """The chains of whole conversations held in memory (one bucket's, or everything's)."""
    tweets: dict[str, Tweet] = {}
    for tweet in tweets_in_order:
        if tweet.id in tweets:
            skips.skip("duplicate_id", tweet.where, f"tweet {tweet.id} seen at {tweets[tweet.id].where}")
        else:
            tweets[tweet.id] = tweet

    def parent_of(tweet_id: str) -> str | None:
        return tweets[tweet_id].parent

    depth = subtree_depths(tweets, parent_of)
    order = {tweet_id: index for index, tweet_id in enumerate(tweets)}
    # The reply with the longest chain below it; on a tie, the earliest in the files.
    for chain in best_chains(tweets, parent_of, lambda tweet_id: (depth[tweet_id], -order[tweet_id])):
        where = tweets[chain[0]].where
        if len(chain) < config.min_turns:
            skips.skip("too_few_turns", where, f"{len(chain)} tweet(s), min_turns={config.min_turns}")
            continue
        yield where, conversation(f"{config.name}:{chain[0]}", config.name,
                                  alternate(tweets[t].text for t in chain), {"tweet_ids": chain})


class ReplyRoots:
    """reply_roots for any number of tweets: the id → parent map in a temporary SQLite table (a dict of
    150M ids would be ~20 GB) and pointer jumping: each pass points every tweet at its pointer's pointer, so
    a reply chain of depth d is resolved in log2(d) passes over the table. Tweets in or below a reply cycle
    never reach a tweet without a parent among them; those few are resolved by reply_roots itself, in the
    order they were added, which gives its answer exactly. A context manager."""

    def __enter__(self) -> ReplyRoots:
        self._folder = tempfile.TemporaryDirectory(prefix="chatforge-roots-")
        self._db = sqlite3.connect(f"{self._folder.name}/roots.sqlite", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16000"):  # scratch tables, 16 MB cache
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE tweets (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, parent TEXT)")
        self._db.execute("BEGIN")
        return self

    def __exit__(self, *exc_info) -> None:
        self._db.close()
        self._folder.cleanup()

    def add(self, tweet_id: str, parent: str | None) -> None:
        """A duplicate id keeps its first parent, as the chain build does."""
        self._db.execute("INSERT OR IGNORE INTO tweets (id, parent) VALUES (?, ?)", (tweet_id, parent))

    def resolve(self) -> None:
        db = self._db
        db.execute("CREATE TABLE up (id TEXT PRIMARY KEY, up TEXT) WITHOUT ROWID")
        db.execute("INSERT INTO up SELECT t.id, COALESCE(p.id, t.id) FROM tweets t LEFT JOIN tweets p ON p.id = t.parent")
        count = db.execute("SELECT COUNT(*) FROM up").fetchone()[0]
        for _ in range(math.ceil(math.log2(count + 1)) + 1):  # enough for any chain; cycles never settle
            jumped = db.execute("UPDATE up SET up = (SELECT next.up FROM up next WHERE next.id = up.up) "
                                "WHERE up != (SELECT next.up FROM up next WHERE next.id = up.up)")
            if jumped.rowcount == 0:
                break
        # a true root has no parent among the tweets; anything else leads into a reply cycle
        cyclic = db.execute("SELECT t.id, t.parent FROM up JOIN tweets top ON top.id = up.up "
                            "JOIN tweets t ON t.id = up.id WHERE top.parent IN (SELECT id FROM tweets) "
                            "ORDER BY t.seq").fetchall()
        for tweet_id, root in reply_roots(dict(cyclic)).items():
            db.execute("UPDATE up SET up = ? WHERE id = ?", (root, tweet_id))

    def root(self, tweet_id: str) -> str:
        return self._db.execute("SELECT up FROM up WHERE id = ?", (tweet_id,)).fetchone()[0]


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    paths = resolve_paths(config.path)
    with Buckets(bucket_count(paths, config.buckets)) as buckets, Buckets(1) as unplaced, ReplyRoots() as roots:
        for conversation_id, tweet in _tweets(paths, config, skips):
            if conversation_id is None:  # API v1.1: its conversation is found from its reply links
                roots.add(tweet.id, tweet.parent)
                unplaced.add("", tweet)
            else:
                buckets.add(conversation_id, tweet)
        roots.resolve()
        for tweet in unplaced.entries():
            buckets.add(roots.root(tweet.id), tweet)
        for tweets in buckets.groups():
            yield from reply_chains(tweets, config, skips)
