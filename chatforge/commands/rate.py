"""`chatforge rate`: judge the blinded A/B items of the human_eval stage in the terminal.

Resumable: items this annotator already rated are not shown again. Works with piped stdin.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ITEMS = Path("reports/human_eval/items.jsonl")
RATINGS = Path("data/human_ratings.jsonl")
CHOICES = {"a": "A", "b": "B", "t": "tie", "tie": "tie", "s": "skip", "skip": "skip", "q": "quit", "quit": "quit"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotator", required=True, help="your name, recorded with every rating")
    parser.add_argument("--items", type=Path, default=ITEMS, help="items written by the human_eval stage")
    parser.add_argument("--ratings", type=Path, default=RATINGS, help="where ratings are appended")


def run(args: argparse.Namespace) -> None:
    from rich.panel import Panel

    from chatforge.console import console
    from chatforge.errors import ChatforgeError
    from chatforge.files import SkipLog, append_jsonl_locked, read_jsonl
    from chatforge.human_eval import load_ratings, rating

    if not args.items.exists():
        raise ChatforgeError(f"{args.items}: not found; run `dvc repro human_eval` first")
    items = read_jsonl(args.items)
    done = {r["item"] for r in load_ratings(args.ratings, SkipLog()) if r["annotator"] == args.annotator}
    todo = [item for item in items if item["id"] not in done]
    console.print(f"{len(todo)} of {len(items)} items left for {args.annotator}. "
                  "Answer a, b, t (tie), s (skip) or q (quit).")
    rated = 0
    for number, item in enumerate(todo, start=1):
        prompt = "\n".join(f"[bold]{t['role']}:[/] {t['content']}" for t in item["prompt"])
        console.print(Panel(prompt, title=f"item {number}/{len(todo)}"))
        for side in ("A", "B"):
            console.print(Panel(item["replies"][side] or "(empty)", title=f"reply {side}"))
        choice = None
        while choice is None:
            console.print("better reply? [a/b/t/s/q] ", end="")
            line = input_line()
            if line is None:
                choice = "quit"
            else:
                choice = CHOICES.get(line.strip().lower())
                if choice is None:
                    console.print(f"[yellow]'{line.strip()}' is not one of a, b, t, s, q[/]")
        if choice == "quit":
            break
        if choice == "skip":
            continue
        append_jsonl_locked(args.ratings, rating(item, choice, args.annotator, origin="rate"))
        rated += 1
    console.print(f"recorded {rated} ratings in {args.ratings}; `dvc repro human_eval` updates the results")


def input_line() -> str | None:
    """One line from stdin, or None at end of input (so scripts can drive the command)."""
    try:
        return input()
    except EOFError:
        return None
