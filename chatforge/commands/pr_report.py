"""`chatforge pr-report --base main`: params, metrics and plot changes as markdown for a reviewer."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="main", help="the git revision to compare against")
    parser.add_argument("--out", type=Path, default=Path("pr-report/report.md"),
                        help="markdown file to write; plot images go in a plots/ folder beside it")


def run(args: argparse.Namespace) -> None:
    from chatforge.console import console
    from chatforge.pr_report import build

    args.out.parent.mkdir(parents=True, exist_ok=True)
    markdown = build(args.base, args.out.parent)
    args.out.write_text(markdown, encoding="utf-8")
    console.print(f"wrote {args.out}")
