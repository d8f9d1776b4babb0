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
All comments' text is held in memory until the chains are built: split a huge dump by subreddit.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Iterator

from chatforge.conversation import alternate, conversation
from chatforge.files import SkipLog, iter_jsonl
from chatforge.params import require
from chatforge.sources.common import Item, SourceConfig, best_chains, require_paths, resolve_paths

GONE = {"[deleted]", "[removed]"}


@dataclass
class Config(SourceConfig):
    path: str | list[str] = ""  # comment and submission dump(s) or globs
    min_score: int = 1  # a new comment starts at 1: below it means downvoted
    min_turns: int = 2

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths(self.path, f"{section}.path", "dump")
        require(self.min_turns >= 2, f"{section}.min_turns", f"={self.min_turns}: must be at least 2")


@dataclass
class Post:
    text: str
    score: int
    parent: str | None  # full name of the parent ("t1_…" comment or "t3_…" submission)
    thread: str
    where: str
    subreddit: str | None
    url: str | None = None


def _text(value) -> str | None:
    """Reddit's HTML-escaped markdown as text; None when deleted, removed or not a string."""
    if not isinstance(value, str):
        return None
    text = html.unescape(value).strip()
    return None if text in GONE else text


def _score(obj: dict) -> int | None:
    score = obj.get("score", 0)
    return score if isinstance(score, int) and not isinstance(score, bool) else None


def _read(config: Config, skips: SkipLog) -> tuple[dict[str, Post], dict[str, Post], set[str]]:
    """Comments and submissions by full name; `dropped` holds full names of dropped comments."""
    comments: dict[str, Post] = {}
    submissions: dict[str, Post] = {}
    dropped: set[str] = set()
    for path in resolve_paths(config.path):
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
                submissions[f"t3_{post_id}"] = Post(
                    f"{title}\n\n{body}".strip(), score, None, f"t3_{post_id}", where, obj.get("subreddit"),
                    f"https://www.reddit.com{permalink}" if isinstance(permalink, str) else None)
                continue
            if "body" not in obj or not isinstance(obj.get("parent_id"), str):
                skips.skip("unknown_shape", where, "neither a comment (body, parent_id) nor a submission (title)")
                continue
            body = _text(obj["body"])
            reason = ("non_string_content" if not isinstance(obj["body"], str) else
                      "deleted_or_removed" if body is None else
                      "empty_text" if not body else
                      "low_score" if score < config.min_score else None)
            if reason:
                skips.skip(reason, where, f"score {score}" if reason == "low_score" else "")
                dropped.add(f"t1_{post_id}")
                continue
            comments[f"t1_{post_id}"] = Post(body, score, obj["parent_id"], obj.get("link_id") or "", where,
                                             obj.get("subreddit"))
    return comments, submissions, dropped


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    comments, submissions, dropped = _read(config, skips)
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
