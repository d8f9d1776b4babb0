"""Blinded A/B comparisons from the web page, and the records a choice becomes.

Only served with `chatforge serve --collect-feedback`. The server keeps the key (which model is A) until the
user has chosen; the page only ever sees the two texts. The two models always differ (the request schema says
so), and a choice is recorded where the pipeline reads it:
- always, a human-eval rating in `data/human_ratings.jsonl` (the `chatforge rate` record, origin "web"), which
  the human_eval stage summarizes;
- A or B preferred (not a tie) with different texts → a preference label in `data/labels/<annotator>.jsonl`
  (the `chatforge label` pair format), which the preferences stage reads, so the feedback reaches the next
  reward model and PPO run with `dvc repro`. A or B preferred with an empty reply is refused (EmptyReply, 409:
  the request is well formed, the comparison's state refuses it): such a pair is no training data. The prompt
  is never empty (the request schema's pattern).
Records are appended under a file lock, so several people can use the page at once.
"""
from __future__ import annotations

import random
import secrets
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

from chatforge.conversation import preference, turn
from chatforge.files import append_jsonl_locked
from chatforge.human_eval import TIE, rating

RATINGS_FILE = "human_ratings.jsonl"
LABELS_DIR = "labels"
ORIGIN = "web"


class UnknownComparison(KeyError):
    """No pending comparison with that id (never made, already judged, or expired)."""


class EmptyReply(ValueError):
    """A or B was preferred, but one reply is empty (the comparison stays pending: a tie can still be recorded)."""

    def __init__(self, side: str):
        super().__init__(side)
        self.side = side


class Comparisons:
    """Pending blinded comparisons (the newest `keep`), and the recording of choices."""

    def __init__(self, data_dir: Path, keep: int = 1000):
        self.ratings_path = Path(data_dir) / RATINGS_FILE
        self.labels_dir = Path(data_dir) / LABELS_DIR
        self.keep = keep
        self._pending: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._shuffle = random.SystemRandom()

    def add(self, prompt: list[dict], replies: list[tuple[str, str]]) -> dict:
        """Store two (model, text) replies in random order; returns what the page may see."""
        first, second = self._shuffle.sample(replies, 2)
        item = {
            "id": f"web-{secrets.token_hex(8)}",
            "prompt": prompt,
            "replies": {"A": first[1], "B": second[1]},
            "key": {"A": first[0], "B": second[0]},
        }
        with self._lock:
            self._pending[item["id"]] = item
            while len(self._pending) > self.keep:
                self._pending.popitem(last=False)
        return {"id": item["id"], "replies": item["replies"]}

    def record(self, item_id: str, choice: str, annotator: str) -> dict:
        """Write the records for `choice` (A, B or tie); returns the revealed key and the files written."""
        with self._lock:
            item = self._pending.get(item_id)
            if item is None:
                raise UnknownComparison(item_id)
            empty = [side for side, text in item["replies"].items() if not text.strip()]
            if choice != TIE and empty:
                raise EmptyReply(empty[0])
            del self._pending[item_id]
        append_jsonl_locked(self.ratings_path, rating(item, choice, annotator, origin=ORIGIN))
        written = [str(self.ratings_path)]
        if choice != TIE and item["replies"]["A"] != item["replies"]["B"]:
            label_path = self.labels_dir / f"{annotator}.jsonl"
            append_jsonl_locked(label_path, preference_label(item, choice, annotator))
            written.append(str(label_path))
        winner = TIE if choice == TIE else item["key"][choice]
        return {"id": item_id, "choice": choice, "winner": winner, "key": item["key"], "written": written}


def preference_label(item: dict, choice: str, annotator: str) -> dict:
    """The `chatforge label` pairwise record: chosen and rejected replies, who judged and when."""
    other = "B" if choice == "A" else "A"
    return preference(
        item["id"],
        ORIGIN,
        item["prompt"],
        [turn("assistant", item["replies"][choice])],
        [turn("assistant", item["replies"][other])],
        meta={
            "annotator": annotator,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "judgement": "prefer",
            "mode": ORIGIN,
            "models": {"chosen": item["key"][choice], "rejected": item["key"][other]},
        },
    )
