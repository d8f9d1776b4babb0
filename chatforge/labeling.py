"""Human preference labels: the items `chatforge label` shows and the records a judgement becomes.

An item is a prompt (a val/test conversation prefix ending in a user turn) with replies sampled for
it in one mode from a set of models; its key is a stable hash of exactly that, so an annotator who
comes back is never shown an item already judged. Records (one JSON line each, see docs/preferences.md):
- a preference (`a`/`b`, or each of the k(k-1)/2 pairs of a ranking): the pair format of
  `chatforge.conversation.preference` with meta {item, annotator, time, mode, judgement: "prefer",
  models: {chosen, rejected}, ranks (ranking mode)};
- a tie or a skip: `{"id", "source", "prompt", "replies", "meta": {..., "judgement": "tie" | "skip"}}`:
  no chosen/rejected, so no consumer can mistake it for a preference. The preferences stage counts them.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Iterator

from chatforge.conversation import preference, stable_hash, turn
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog, iter_jsonl, read_jsonl
from chatforge.preferences import PreferencesConfig, prefixes, prompt_key

SOURCE = "label"


@dataclass
class Item:
    key: str
    prompt: list[dict]
    mode: str
    replies: list  # generate.Reply, in display order
    models: list[str]  # model of each displayed reply

    @property
    def labels(self) -> list[str]:
        return ["A", "B"] if self.mode == "pairwise" else [str(i + 1) for i in range(len(self.replies))]


def parse_ranking(line: str, k: int) -> list[int] | str | None:
    """"2 1 3" → display positions best first ([1, 0, 2]); "s"/"q" → skip/quit; anything else → None."""
    text = line.strip().lower()
    if text in ("s", "skip", "q", "quit"):
        return {"s": "skip", "q": "quit"}.get(text, text)
    parts = text.replace(",", " ").split()
    if sorted(parts) != sorted(str(i) for i in range(1, k + 1)):
        return None
    return [int(part) - 1 for part in parts]


def judgement_records(item: Item, answer: str | list[int], annotator: str) -> list[dict]:
    """The records of one judgement: pairs for a preference or ranking, one no-pair record for tie/skip."""
    meta = {"item": item.key, "annotator": annotator,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": item.mode}
    if answer in ("tie", "skip"):
        return [{"id": f"{SOURCE}:{annotator}:{item.key}", "source": SOURCE, "prompt": item.prompt,
                 "replies": [[turn("assistant", r.text)] for r in item.replies],
                 "meta": {**meta, "judgement": answer, "models": item.models}}]
    order = {"a": [0, 1], "b": [1, 0]}[answer] if isinstance(answer, str) else answer
    records = []
    for better, worse in combinations(range(len(order)), 2):  # rank positions, best first
        chosen, rejected = order[better], order[worse]
        ranks = {"ranks": {"chosen": better + 1, "rejected": worse + 1}} if item.mode == "ranking" else {}
        records.append(preference(
            f"{SOURCE}:{annotator}:{item.key}:{item.labels[chosen]}>{item.labels[rejected]}", SOURCE, item.prompt,
            [turn("assistant", item.replies[chosen].text)], [turn("assistant", item.replies[rejected].text)],
            meta={**meta, "judgement": "prefer", **ranks,
                  "models": {"chosen": item.models[chosen], "rejected": item.models[rejected]}}))
    return records


def judged_items(path: Path) -> set[str]:
    """Item keys already in an annotator's label file (unreadable lines are ignored, not fatal)."""
    if not path.exists():
        return set()
    return {record.get("meta", {}).get("item") for _, record in iter_jsonl(path, SkipLog())
            if isinstance(record.get("meta"), dict)}


@dataclass
class LabelSession:
    prompts: list[list[dict]]  # unique prompts, in the labelling order
    model_dirs: list[Path]
    mode: str
    k: int
    labels_path: Path
    done: set[str]

    @classmethod
    def open(cls, conversation_files: list[Path], model_dirs: list[Path], mode: str, k: int | None, seed: int,
             labels_path: Path) -> "LabelSession":
        from chatforge.params import PARAMS_FILE, section

        if mode == "pairwise":
            k = 2
        elif k is None:
            k = section(PreferencesConfig, "preferences").label_k if Path(PARAMS_FILE).exists() else PreferencesConfig().label_k
        if k < 2:
            raise ChatforgeError(f"--k {k}: rank at least 2 replies")
        conversations = []
        for path in conversation_files:
            if not path.exists():
                raise ChatforgeError(f"{path}: not found; run `dvc repro clean` or pass --conversations")
            conversations += read_jsonl(path)
        unique = {prompt_key(p.prompt): p.prompt for p in prefixes(conversations)}
        # The same order for every annotator, so their judgements overlap and agreement can be measured.
        ordered = sorted(unique, key=lambda key: stable_hash(f"{seed}:{key}"))
        if not ordered:
            raise ChatforgeError(f"{', '.join(map(str, conversation_files))}: no prompt (a user turn followed by "
                                 "an assistant turn) to label")
        return cls([unique[key] for key in ordered], list(model_dirs), mode, k, labels_path, judged_items(labels_path))

    def item_key(self, prompt: list[dict]) -> str:
        identity = [prompt, self.mode, self.k, [str(path) for path in self.model_dirs]]
        return f"{stable_hash(json.dumps(identity, sort_keys=True, ensure_ascii=False)):016x}"[:12]

    @property
    def total(self) -> int:
        return len(self.prompts)

    @property
    def remaining(self) -> int:
        return sum(self.item_key(p) not in self.done for p in self.prompts)

    def items(self) -> Iterator[Item]:
        """Unjudged items with `k` distinct non-empty sampled replies (prompts that give fewer are passed over)."""
        from chatforge.inference.generate import generate_reply
        from chatforge.inference.loading import load_model
        from chatforge.inference.prompting import fit_history, prompt_budget
        from chatforge.inference.sampling import default_sampling

        sampling = default_sampling()
        models = [load_model(path) for path in self.model_dirs]
        for prompt in self.prompts:
            key = self.item_key(prompt)
            if key in self.done:
                continue
            texts, sources = [], []
            for attempt in range(3 * self.k):
                if len(texts) == self.k:
                    break
                model, tokenizer = models[attempt % len(models)]
                try:
                    messages, _ = fit_history(tokenizer, prompt, prompt_budget(model, sampling))
                except ChatforgeError:
                    break  # the prompt alone does not fit this model
                reply = generate_reply(model, tokenizer, messages, sampling, seed=stable_hash(f"{key}:{attempt}") % 2**31)
                if reply.text.strip() and reply.text.strip() not in {t.text.strip() for t in texts}:
                    texts.append(reply)
                    sources.append(str(self.model_dirs[attempt % len(models)]))
            if len(texts) < self.k:
                continue
            order = list(range(self.k))
            random.Random(key).shuffle(order)  # blind: the display order says nothing about the model
            self.done.add(key)
            yield Item(key, prompt, self.mode, [texts[i] for i in order], [sources[i] for i in order])
