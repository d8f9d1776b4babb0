"""Blinded A/B human evaluation: items, the HTML sheet, ratings and their summary.

Items pair two models' replies to the same held-out prompts (the evaluate stage's samples). Each item's
A/B order is drawn from a stable hash of its id and the seed; the key (which model is A) lives only in
`items.jsonl`, never in the sheet. A rating names the winning model (or "tie"), so ratings survive a
re-shuffle and the web page and `chatforge rate` write the same records.
"""
from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from chatforge.conversation import stable_hash
from chatforge.stats import wilson_interval
from chatforge.files import SkipLog, iter_jsonl

TIE = "tie"


@dataclass
class HumanEvalConfig:
    """params.yaml `human_eval`: which two evaluated models people compare (any of evaluation.MODELS; dvc.yaml
    reads their samples through these params), on how many held-out prompts."""

    model_a: str = "sft"
    model_b: str = "ppo"
    num_items: int = 30
    seed: int = 0

    def validate(self, section: str) -> None:
        from chatforge.evaluation import MODELS
        from chatforge.params import require

        for key in ("model_a", "model_b"):
            require(getattr(self, key) in MODELS, f"{section}.{key}",
                    f"={getattr(self, key)!r}: must be an evaluated model, one of {', '.join(MODELS)}")
        require(self.model_a != self.model_b, f"{section}.model_b", "must differ from model_a")
        require(self.num_items > 0, f"{section}.num_items", "must be positive")


def build_items(samples: dict[str, list[dict]], model_a: str, model_b: str, num_items: int, seed: int) -> list[dict]:
    """Items from the two models' samples on the prompts both answered, in a stable order."""
    by_id = {name: {s["id"]: s for s in samples[name]} for name in (model_a, model_b)}
    shared = sorted(set(by_id[model_a]) & set(by_id[model_b]), key=lambda i: stable_hash(f"{seed}:{i}"))
    items = []
    for item_id in shared[:num_items]:
        first, second = (model_a, model_b) if stable_hash(f"{seed}:order:{item_id}") % 2 == 0 else (model_b, model_a)
        items.append({
            "id": item_id,
            "prompt": by_id[model_a][item_id]["prompt"],
            "replies": {"A": by_id[first][item_id]["reply"], "B": by_id[second][item_id]["reply"]},
            "key": {"A": first, "B": second},
            "reward_scores": {name: by_id[name][item_id].get("score") for name in (model_a, model_b)},
        })
    return items


def render_sheet(items: list[dict], title: str) -> str:
    """A self-contained page: prompts and blinded replies A/B, with no trace of which model is which."""
    rows = []
    for number, item in enumerate(items, start=1):
        prompt = "".join(
            f'<div class="turn {html.escape(t["role"])}"><b>{html.escape(t["role"])}</b> {html.escape(t["content"])}</div>'
            for t in item["prompt"]
        )
        replies = "".join(
            f'<div class="reply"><h3>{side}</h3><p>{html.escape(item["replies"][side]) or "<i>(empty)</i>"}</p></div>'
            for side in ("A", "B")
        )
        rows.append(
            f'<section><h2>Item {number} <small>{html.escape(item["id"])}</small></h2>{prompt}'
            f'<div class="pair">{replies}</div><p class="ask">Better reply: A / B / tie</p></section>'
        )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "section{border-bottom:1px solid #ddd;padding:1rem 0}.turn{margin:.2rem 0}.pair{display:flex;gap:1rem}"
        ".reply{flex:1;background:#f6f6f8;border-radius:.5rem;padding:.5rem 1rem}small{color:#888}"
        ".ask{color:#555;font-style:italic}"
    )
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>For each prompt, judge which reply is better (helpful, fluent, on topic). The order of A and B is "
        "random per item. Record your judgements with <code>chatforge rate</code>.</p>"
        f"{''.join(rows)}</body></html>\n"
    )


def rating(item: dict, choice: str, annotator: str, origin: str) -> dict:
    """A rating record for `choice` in {A, B, tie}: names the winning model, never the side."""
    winner = TIE if choice == TIE else item["key"][choice]
    return {
        "item": item["id"],
        "prompt": item["prompt"],
        "replies": {item["key"][side]: item["replies"][side] for side in ("A", "B")},
        "winner": winner,
        "annotator": annotator,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "origin": origin,
    }


def load_ratings(path: Path, skips: SkipLog) -> list[dict]:
    if not path.exists():
        return []
    ratings = []
    for lineno, record in iter_jsonl(path, skips):
        if not isinstance(record.get("winner"), str) or not isinstance(record.get("annotator"), str) \
                or not isinstance(record.get("replies"), dict):
            skips.skip("bad_rating", f"{path}:{lineno}", "needs winner, annotator and replies")
            continue
        ratings.append(record)
    return ratings


def summarize(ratings: list[dict], model_a: str, model_b: str, items: list[dict]) -> dict:
    """Win rates with 95% Wilson intervals (ties excluded from the rate, reported beside it), and the
    reward model's verdict on the same items. With no ratings, n = 0 and no rate is invented."""
    pair = {model_a, model_b}
    relevant = [r for r in ratings if set(r["replies"]) == pair]
    latest = {}
    for r in relevant:  # an annotator who rates an item twice counts once, with the last judgement
        latest[(r["annotator"], r["item"])] = r
    wins = Counter(r["winner"] for r in latest.values())
    decided = wins[model_a] + wins[model_b]
    models = {}
    for name in (model_a, model_b):
        low, high = wilson_interval(wins[name], decided)
        models[name] = {
            "wins": wins[name],
            "win_rate": wins[name] / decided if decided else None,
            "ci95": [low, high] if decided else None,
        }
    verdicts = Counter()
    for item in items:
        a, b = item["reward_scores"][model_a], item["reward_scores"][model_b]
        if a is not None and b is not None:
            verdicts[model_a if a > b else model_b if b > a else TIE] += 1
    judged = sum(verdicts.values())
    return {
        "pair": [model_a, model_b],
        "n": len(latest),
        "ties": wins[TIE],
        "annotators": len({annotator for annotator, _ in latest}),
        "models": models,
        "ratings_for_other_pairs": len(ratings) - len(relevant),
        "reward_model": {
            "items": judged,
            "wins": {name: verdicts[name] for name in (model_a, model_b)},
            "win_rate": {name: verdicts[name] / judged if judged else None for name in (model_a, model_b)},
        },
    }

