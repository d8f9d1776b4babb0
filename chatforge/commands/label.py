"""`chatforge label`: judge sampled replies in the terminal; the judgements become preference pairs.

A prompt from the val/test conversations is shown with replies sampled from the SFT model (or from
`--models A B ...`, round robin), in random order. Two modes:
- pairwise: answer a, b, t (tie), s (skip), q (quit);
- ranking of k replies (`preferences.label_k`): answer the reply numbers best first, e.g. "2 1 3 4";
  one ranking yields all k(k-1)/2 pairs, as InstructGPT's labelers' rankings did.
Every judgement is appended to `data/labels/<annotator>.jsonl` in one locked write (see
docs/preferences.md for the record format). A tie or a skip is recorded too, so the item is never shown
again to that annotator, but yields no pair. Works with piped stdin, so a script can drive it.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

CONVERSATIONS = [Path("data/clean/val.jsonl"), Path("data/clean/test.jsonl")]
LABELS = Path("data/labels")
SFT_MODEL = Path("models/sft")
PAIRWISE_ANSWERS = {"a": "a", "b": "b", "t": "tie", "tie": "tie", "s": "skip", "skip": "skip", "q": "quit",
                    "quit": "quit"}
ANNOTATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotator", required=True, help="your name; labels go to data/labels/<annotator>.jsonl")
    parser.add_argument("--mode", choices=["pairwise", "ranking"], default="pairwise")
    parser.add_argument("--k", type=int, default=None, help="replies to rank (default: params preferences.label_k)")
    parser.add_argument("--models", type=Path, nargs="+", default=[SFT_MODEL],
                        help="model dirs the replies are sampled from, round robin (default: models/sft)")
    parser.add_argument("--conversations", type=Path, nargs="+", default=CONVERSATIONS,
                        help="where prompts come from (default: the val and test splits)")
    parser.add_argument("--labels-dir", type=Path, default=LABELS)
    parser.add_argument("--limit", type=int, default=0, help="stop after this many items (0 = until the end)")
    parser.add_argument("--seed", type=int, default=0, help="order of the prompts (the same for every annotator)")


def run(args: argparse.Namespace) -> None:
    from rich.panel import Panel

    from chatforge.commands.rate import input_line
    from chatforge.console import console
    from chatforge.errors import ChatforgeError
    from chatforge.files import append_jsonl_locked
    from chatforge.labeling import LabelSession, judgement_records, parse_ranking

    if not ANNOTATOR_NAME.match(args.annotator):
        raise ChatforgeError(f"--annotator {args.annotator!r}: use letters, digits, '.', '_' or '-' (it names a file)")
    session = LabelSession.open(args.conversations, args.models, args.mode, args.k, args.seed,
                                args.labels_dir / f"{args.annotator}.jsonl")
    left = session.remaining
    console.print(f"{left} of {session.total} prompts left for {args.annotator} ({args.mode}, "
                  f"{session.k} replies each). " + (
                      "Answer a, b, t (tie), s (skip) or q (quit)." if args.mode == "pairwise" else
                      f"Answer the reply numbers best first (e.g. {' '.join(map(str, range(session.k, 0, -1)))}), "
                      "s (skip) or q (quit)."))
    judged = pairs = 0
    for item in session.items():
        prompt = "\n".join(f"[bold]{t['role']}:[/] {t['content']}" for t in item.prompt)
        console.print(Panel(prompt, title=f"item {item.key} ({judged + 1}/{left})"))
        for label, reply in zip(item.labels, item.replies):
            console.print(Panel(reply.text or "(empty)", title=f"reply {label}"))
        answer = None
        while answer is None:
            console.print("better reply? [a/b/t/s/q] " if args.mode == "pairwise" else "ranking (best first)? ",
                          end="")
            line = input_line()
            if line is None:
                answer = "quit"
            elif args.mode == "pairwise":
                answer = PAIRWISE_ANSWERS.get(line.strip().lower())
            else:
                answer = parse_ranking(line, session.k)
            if answer is None:
                console.print(f"[yellow]{line.strip()!r} is not a valid answer[/]")
        if answer == "quit":
            break
        records = judgement_records(item, answer, args.annotator)
        append_jsonl_locked(session.labels_path, records)
        judged += 1
        pairs += sum("chosen" in r for r in records)
        if args.limit and judged >= args.limit:
            break
    console.print(f"recorded {judged} judgements ({pairs} pairs) in {session.labels_path}; "
                  "`dvc repro reward` trains on them")
