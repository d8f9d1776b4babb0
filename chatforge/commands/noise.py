"""`chatforge noise --seeds 5`: how much the metrics move when only the seeds move (reports/noise.json).

The runs happen in a temporary copy of the project (chatforge/noise.py), one after another, so the workspace is
untouched except for the noise file. `--profile`/`-S` measure it at other params (a tiny profile in tests); the
file records the params it was measured at: `chatforge pr-report` says when they no longer match, and the report
card then withholds its noise bands.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=5, help="pipeline runs, every seed moved by 0, 1, … (default 5)")
    parser.add_argument("--profile", help="a params profile laid over params.yaml (profiles/<name>.yaml or a file)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a params override (YAML value), as `dvc exp run -S`; repeatable")
    parser.add_argument("--out", type=Path, default=Path("reports/noise.json"), help="where to write the result")
    parser.add_argument("--work-dir", type=Path,
                        help="run in this folder and keep it (default: a temporary folder, removed afterwards)")


def run(args: argparse.Namespace) -> None:
    from rich.table import Table

    from chatforge.commands.experiment import load_profile
    from chatforge.console import console, log
    from chatforge.errors import ChatforgeError
    from chatforge.files import write_json
    from chatforge.noise import measure, merged, with_overrides
    from chatforge.params import load_params

    if args.seeds < 2:
        raise ChatforgeError(f"--seeds {args.seeds}: a spread needs at least 2 runs")
    params = load_params()
    if args.profile:
        params = merged(params, load_profile(args.profile)[1])
    params = with_overrides(params, args.overrides)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="chatforge-noise-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    log("noise", f"{args.seeds} pipeline runs in {work_dir} (dvc output: {work_dir / 'dvc-repro.log'})")
    try:
        noise = measure(Path("."), args.seeds, params, work_dir.resolve())
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    write_json(args.out, noise)

    table = Table("metric", "mean", "std", "min", "max", title=f"noise over {args.seeds} seeds")
    for name, metrics in noise["metrics"].items():
        for key, stats in metrics.items():
            if stats["std"] > 0:
                table.add_row(f"{name} {key}", *(f"{stats[s]:.4g}" for s in ("mean", "std", "min", "max")))
    console.print(table)
    minutes = [run["seconds"] / 60 for run in noise["runs"]]
    log("noise", f"wrote {args.out}: params hash {noise['params_hash']}, {sum(minutes) / len(minutes):.1f} min a run")
