"""Reddit dumps (Pushshift-style JSONL, optionally .gz/.zst): reply chains as conversations.

Comments ({"id", "parent_id", "link_id", "body", "score", ...}) and submissions ({"id", "title",
"selftext", ...}) may sit in the same or separate files; each line is recognised by its fields.
- A comment whose body is [deleted]/[removed]/empty, or whose score is below `min_score`, is dropped,
  and so is the subtree under it (a reply without the comment it answers is not a conversation).
- A comment whose parent is simply not in the files (dumps are split by month) starts a chain.
- Each top-level comment gives ONE chain: at every step the highest-scored reply (see
  common.best_chains); every root-to-leaf path would repeat shared prefixes as near-duplicates.
- The submission's title (+ self text) is the first user turn when the submission is present and
  passes `min_score`. Chains shorter than `min_turns` are counted and dropped.
Memory is bounded (sources.buckets): a first pass files every post under its thread (`link_id`, a
submission under its own name) into `buckets` temporary files; a second pass builds the chains of
one bucket at a time. A reply tree never leaves its thread, so the chains are those of one build
over everything.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from chatforge.conversation import alternate, conversation
from chatforge.files import SkipLog, iter_jsonl
from chatforge.params import require
from chatforge.sources.buckets import Buckets, bucket_count
from chatforge.sources.common import Item, SourceConfig, best_chains, require_paths, resolve_paths

GONE = {"[deleted]", "[removed]"}


@dataclass
class Config(SourceConfig):
    path: str | list[str] = ""  # comment and submission dump(s) or globs
    min_score: int = 1  # a new comment starts at 1: below it means downvoted
    min_turns: int = 2
    buckets: int = 0  # threads are spread over this many temporary files; 0: one per ~32 MB of input

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths(self.path, f"{section}.path", "dump")
        require(self.min_turns >= 2, f"{section}.min_turns", f"={self.min_turns}: must be at least 2")
        require(self.buckets >= 0, f"{section}.buckets", f"={self.buckets}: must be 0 (from the input size) or more")


class Post(NamedTuple):
    text: str
    score: int
    parent: str | None  # full name of the parent ("t1_…" comment or "t3_…" submission)
    thread: str
    where: str
    subreddit: str | None
    url: str | None = None


# A post as filed in a bucket: (kind, full name, post); kind is submission, comment or dropped (post None).
Entry = tuple[str, str, Post | None]


def _text(value) -> str | None:
    """Reddit's HTML-escaped markdown as text; None when deleted, removed or not a string."""
    if not isinstance(value, str):
        return None
    text = html.unescape(value).strip()
    return None if text in GONE else text


def _score(obj: dict) -> int | None:
    score = obj.get("score", 0)
    return score if isinstance(score, int) and not isinstance(score, bool) else None


def _thread(obj: dict) -> str | None:
    """The submission a comment belongs to: `link_id`, or the parent when that is the submission."""
    link_id = obj.get("link_id")
    if isinstance(link_id, str) and link_id:
        return link_id
    return obj["parent_id"] if obj["parent_id"].startswith("t3_") else None


def _entries(paths: list[Path], config: Config, skips: SkipLog) -> Iterator[tuple[str, Entry]]:
    """(thread, entry) for each submission and comment line; malformed and deleted ones are counted."""
    for path in paths:
        for lineno, obj in iter_jsonl(path, skips):
            where = f"{path}:{lineno}"
            post_id, score = obj.get("id"), _score(obj)
            if not isinstance(post_id, str) or not post_id or score is None:
                skips.skip("bad_field", where, "id must be a string and score an integer")
                continue
            if "title" in obj:  # a submission
                title, body = _text(obj.get("title")), _text(obj.get("selftext")) or ""
                if title is None or score < config.min_score:
                    # Its comments still form chains; only the opening turn is missing.
                    skips.skip("deleted_or_removed" if title is None else "low_score", where, "submission")
                    continue
                permalink = obj.get("permalink")
                name = f"t3_{post_id}"
                yield name, ("submission", name, Post(
                    f"{title}\n\n{body}".strip(), score, None, name, where, obj.get("subreddit"),
                    f"https://www.reddit.com{permalink}" if isinstance(permalink, str) else None))
                continue
            if "body" not in obj or not isinstance(obj.get("parent_id"), str):
                skips.skip("unknown_shape", where, "neither a comment (body, parent_id) nor a submission (title)")
                continue
            body, thread = _text(obj["body"]), _thread(obj)
            reason = ("non_string_content" if not isinstance(obj["body"], str) else
                      "deleted_or_removed" if body is None else
                      "empty_text" if not body else
                      "low_score" if score < config.min_score else None)
            if reason:
                skips.skip(reason, where, f"score {score}" if reason == "low_score" else "")
                if thread:  # its replies learn from this that their parent was dropped
                    yield thread, ("dropped", f"t1_{post_id}", None)
                continue
            if thread is None:
                skips.skip("bad_field", where, "a reply needs link_id, the thread it belongs to")
                continue
            yield thread, ("comment", f"t1_{post_id}", Post(body, score, obj["parent_id"], thread, where,
                                                            obj.get("subreddit")))


def thread_chains(entries: Iterable[Entry], config: Config, skips: SkipLog) -> Iterator[Item]:
    """The conversations of whole threads held in memory (one bucket's, or everything's)."""
    comments: dict[str, Post] = {}
    submissions: dict[str, Post] = {}
    dropped: set[str] = set()
    for kind, name, post in entries:
        if kind == "comment":
            comments[name] = post
        elif kind == "submission":
            submissions[name] = post
        else:
            dropped.add(name)
    for chain in best_chains(comments, lambda name: comments[name].parent, lambda name: (comments[name].score,)):
        top = comments[chain[0]]
        if top.parent in dropped:
            skips.skip("parent_dropped", top.where, "replies to a deleted, removed or low-score comment")
            continue
        submission = submissions.get(top.parent)
        posts = ([submission] if submission else []) + [comments[name] for name in chain]
        if len(posts) < config.min_turns:
            skips.skip("too_few_turns", top.where, f"{len(posts)} turn(s), min_turns={config.min_turns}")
            continue
        meta = {"subreddit": top.subreddit, "thread": top.thread, "scores": [post.score for post in posts],
                "comment_ids": [name.removeprefix("t1_") for name in chain]}
        if submission and submission.url:
            meta["url"] = submission.url
        yield top.where, conversation(f"{config.name}:{chain[0].removeprefix('t1_')}", config.name,
                                      alternate(post.text for post in posts), meta)


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    paths = resolve_paths(config.path)
    with Buckets(bucket_count(paths, config.buckets)) as buckets:
        for thread, entry in _entries(paths, config, skips):
            buckets.add(thread, entry)
        for entries in buckets.groups():
            yield from thread_chains(entries, config, skips)
