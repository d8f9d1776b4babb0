"""`chatforge pr-report --base main`: metric changes judged against the seed noise, params, times and plots."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="main", help="the git revision to compare against")
    parser.add_argument("--out", type=Path, default=Path("pr-report/report.md"),
                        help="markdown file to write; plot images go in a plots/ folder beside it")
    parser.add_argument("--sigmas", type=float, default=None,
                        help="a change within this many σ is noise (default 2√2 ≈ 2.83: 2σ of the difference of "
                             "two single runs); σ is the seed spread widened for the few runs it came from and, for "
                             "a rate, at least its binomial error")


def run(args: argparse.Namespace) -> None:
    from chatforge.console import console
    from chatforge.files import atomic_path
    from chatforge.pr_report import DEFAULT_SIGMAS, build

    markdown = build(args.base, args.out.parent, DEFAULT_SIGMAS if args.sigmas is None else args.sigmas)
    with atomic_path(args.out) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    console.print(f"wrote {args.out}")
