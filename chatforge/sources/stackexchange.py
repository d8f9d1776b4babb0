"""Stack Exchange data dump `Posts.xml`: a question and its best answer as a conversation.

The user turn is the question's title and body, the assistant turn its accepted answer when that
scores at least `min_score`, else its top-scored answer that does. HTML becomes text: paragraphs and
list items on their own lines, `<pre>` blocks kept verbatim in ``` fences, inline `<code>` in backticks.
The file is parsed as a stream (expat, which also gives line numbers). Memory is bounded
(sources.buckets): a first pass files each question and answer under the question's id into `buckets`
temporary files; a second pass pairs one bucket's questions with their answers at a time. Dumps list
a question before its answers (ids ascend), and a bucket keeps the file's order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Iterator
from xml.parsers import expat

from chatforge.conversation import conversation, turn
from chatforge.files import SkipLog, open_text
from chatforge.params import require
from chatforge.sources.buckets import Buckets, bucket_count
from chatforge.sources.common import Item, SourceConfig, require_paths

BLOCK_TAGS = {"p", "div", "blockquote", "ul", "ol", "table", "tr", "hr",
              "h1", "h2", "h3", "h4", "h5", "h6"}
READ_CHUNK = 1 << 20


@dataclass
class Config(SourceConfig):
    path: str = ""  # the Posts.xml of one site (post ids are per site: one source per site)
    min_score: int = 1  # for the question and the answer
    site: str = ""  # e.g. cooking.stackexchange.com: adds the question's URL to meta
    buckets: int = 0  # questions are spread over this many temporary files; 0: one per ~32 MB of input

    def validate(self, section: str) -> None:
        super().validate(section)
        require_paths(self.path, f"{section}.path", "Posts.xml")
        require(self.buckets >= 0, f"{section}.buckets", f"={self.buckets}: must be 0 (from the input size) or more")


class _HtmlText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self.pre_depth += 1
            self.parts.append("\n\n```\n")
        elif tag == "code" and not self.pre_depth:
            self.parts.append("`")
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag == "br":
            self.parts.append("\n")
        elif tag == "img":
            self.parts.append(dict(attrs).get("alt") or "")
        elif tag in BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
            self.parts.append("\n```\n\n")
        elif tag == "code" and not self.pre_depth:
            self.parts.append("`")
        elif tag in BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    segments = "".join(parser.parts).split("```")
    for index, segment in enumerate(segments):
        if index % 2:  # inside a code fence: verbatim, one newline each side
            segments[index] = "\n" + segment.strip("\n") + "\n"
        else:
            lines = "\n".join(line.strip() for line in segment.split("\n"))
            segments[index] = re.sub(r"\n{3,}", "\n\n", lines)
    return "```".join(segments).strip()


@dataclass
class Question:
    title: str
    body: str
    score: int
    accepted_id: str | None
    tags: list[str]
    where: str


@dataclass
class Answers:
    accepted: dict | None = None
    top: dict | None = None


def _int(value: str | None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _rows(path, skips: SkipLog) -> Iterator[tuple[int, dict]]:
    """(line, attributes) of each <row> element, streamed; malformed XML stops the file, counted."""
    rows: list[tuple[int, dict]] = []
    parser = expat.ParserCreate()
    parser.StartElementHandler = lambda name, attrs: rows.append((parser.CurrentLineNumber, attrs)) if name == "row" else None
    with open_text(path) as handle:
        try:
            while chunk := handle.read(READ_CHUNK):
                parser.Parse(chunk, False)
                yield from rows
                rows.clear()
            parser.Parse("", True)
            yield from rows
        except expat.ExpatError as error:
            yield from rows
            skips.skip("bad_xml", f"{path}:{error.lineno}", f"{expat.ErrorString(error.code)}; rest of the file unread")
        except UnicodeDecodeError:
            skips.skip("bad_encoding", str(path), "not valid UTF-8; rest of the file unread")


# A post as filed in a bucket: (where, PostTypeId, score, attributes).
Post = tuple[str, str, int, dict]


def _posts(config: Config, skips: SkipLog) -> Iterator[tuple[str, Post]]:
    """(question id, post) for each question and answer that scores at least min_score; others counted."""
    for line, row in _rows(config.path, skips):
        where, kind, score = f"{config.path}:{line}", row.get("PostTypeId"), _int(row.get("Score"))
        if kind not in ("1", "2"):
            continue  # wiki, tag excerpts, moderator nominations …
        if not row.get("Id") or score is None or not isinstance(row.get("Body"), str):
            skips.skip("bad_field", where, "a post needs Id, an integer Score and a Body")
            continue
        if score < config.min_score:
            skips.skip("low_score", where, f"score {score}")
            continue
        yield row["Id"] if kind == "1" else row.get("ParentId") or "", (where, kind, score, row)


def question_answer_pairs(posts: Iterable[Post], config: Config, skips: SkipLog) -> Iterator[Item]:
    """Each question with its best answer, from posts held in memory (one bucket's, or everything's)."""
    questions: dict[str, Question] = {}
    answers: dict[str, Answers] = {}
    for where, kind, score, row in posts:
        if kind == "1":
            questions[row["Id"]] = Question(row.get("Title") or "", row["Body"], score, row.get("AcceptedAnswerId"),
                                            re.findall(r"[^<>|]+", row.get("Tags") or ""), where)
            continue
        parent = row.get("ParentId")
        slot = answers.setdefault(parent, Answers())
        answer = {"id": row["Id"], "body": row["Body"], "score": score}
        question = questions.get(parent)
        if question and question.accepted_id == row["Id"]:
            slot.accepted = answer
        elif slot.top is None or score > slot.top["score"]:
            slot.top = answer
    for question_id, question in questions.items():
        slot = answers.get(question_id)
        answer = slot and (slot.accepted or slot.top)
        if not answer:
            skips.skip("no_answer", question.where, f"no answer with score >= {config.min_score}")
            continue
        prompt = "\n\n".join(part for part in (question.title.strip(), html_to_text(question.body)) if part)
        meta = {"question_id": question_id, "answer_id": answer["id"], "score": question.score,
                "answer_score": answer["score"], "accepted": answer is slot.accepted, "tags": question.tags}
        if config.site:
            meta["url"] = f"https://{config.site}/questions/{question_id}"
        yield question.where, conversation(f"{config.name}:{question_id}", config.name,
                                           [turn("user", prompt), turn("assistant", html_to_text(answer["body"]))], meta)


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    with Buckets(bucket_count([Path(config.path)], config.buckets)) as buckets:
        for question_id, post in _posts(config, skips):
            buckets.add(question_id, post)
        for posts in buckets.groups():
            yield from question_answer_pairs(posts, config, skips)
