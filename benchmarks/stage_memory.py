"""Peak memory per stage: every stage of the pipeline at a profile's params, its peak resident memory beside the
model's parameter bytes (the weights as saved in models/base), as a ratio.

Runs `dvc repro` in a copy of the project (as `chatforge noise` does: the workspace, its outputs and its lock stay
untouched), then reads each stage report's `provenance.peak_memory`: the largest resident set of the stage process
or of a child it waited for, as `/usr/bin/time` gives it. `--workspace` reads a project that already ran instead
(the workspace after `dvc repro`, or a kept `--work-dir`); `--dry-run` prints the params and the stages and runs
nothing. A stage without a JSON report of its own (`report`) has no row.

    python benchmarks/stage_memory.py --profile smollm2-135m [-S section.key=value] [--until dpo] [--work-dir DIR]
    python benchmarks/stage_memory.py --workspace .

Figures: docs/memory.md, "Per stage".
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from chatforge.commands.experiment import load_profile  # noqa: E402
from chatforge.metrics import read_report  # noqa: E402
from chatforge.noise import copy_project, merged, repro, with_overrides  # noqa: E402
from chatforge.params import load_params  # noqa: E402
from chatforge.provenance import KEY as PROVENANCE  # noqa: E402
from chatforge.provenance import PEAK_MEMORY  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
MODEL = Path("models/base")  # sft, ppo and dpo have its size, the reward model about it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="a params profile laid over params.yaml (profiles/<name>.yaml or a file)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a params override (YAML value), as `dvc exp run -S`; repeatable")
    parser.add_argument("--until", action="append", default=[], metavar="STAGE",
                        help="run only this stage and what it depends on (repeatable; default: every stage)")
    parser.add_argument("--work-dir", type=Path,
                        help="run in this folder and keep it (default: a temporary folder, removed afterwards)")
    parser.add_argument("--workspace", type=Path,
                        help="run nothing: read the stage reports of this project, which already ran")
    parser.add_argument("--dry-run", action="store_true", help="print the params and the stages, run nothing")
    args = parser.parse_args(argv)
    if args.workspace and (args.profile or args.overrides or args.until or args.work_dir):
        parser.error("--workspace reads a run that already happened: it takes no params, stages or work dir")
    return args


def planned_params(args: argparse.Namespace) -> dict:
    """params.yaml with the profile laid over it and the overrides applied: the params the stages run at."""
    params = load_params(PROJECT / "params.yaml")
    if args.profile:
        params = merged(params, load_profile(args.profile)[1])
    return with_overrides(params, args.overrides)


def changed_knobs(params: dict, base: dict, prefix: str = "") -> dict:
    """Dotted key -> value for every knob of `params` that differs from `base` (a whole mapping where `base` has
    none to descend into)."""
    found = {}
    for key, value in params.items():
        before = base.get(key) if isinstance(base, dict) else None
        if isinstance(value, dict) and isinstance(before, dict):
            found.update(changed_knobs(value, before, f"{prefix}{key}."))
        elif value != before:
            found[f"{prefix}{key}"] = value
    return found


def stage_reports(root: Path) -> dict[str, str]:
    """Stage name (matrix stages as `evaluate@sft`) -> its report (its JSON out under reports/), in dvc.yaml's
    order."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = {}
        for stage in repo.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path).relative_to(Path(repo.root_dir)).as_posix()
                if path.startswith("reports/") and path.endswith(".json"):
                    found[stage.name] = path
    return found


def parameter_bytes(model_dir: Path) -> int | None:
    """Bytes of the weights in `model_dir`'s safetensors files, read from their headers (nothing loaded); None
    without any."""
    total, files = 0, sorted(model_dir.glob("*.safetensors"))
    for file in files:
        with open(file, "rb") as stream:
            header = json.loads(stream.read(struct.unpack("<Q", stream.read(8))[0]))
        total += sum(end - start for name, tensor in header.items() if name != "__metadata__"
                     for start, end in [tensor["data_offsets"]])
    return total if files else None


def memory_table(root: Path) -> str:
    """Per stage: peak RSS, its ratio to the parameter bytes, the largest child's peak and the GPU peak (MB)."""
    weights = parameter_bytes(root / MODEL)
    weights_mb = weights / 1e6 if weights else None
    lines = [f"parameter bytes ({MODEL}): " + (f"{weights_mb:.1f} MB" if weights_mb else "no model, no ratio"),
             f"{'stage':<18}{'peak RSS MB':>13}{'x params':>10}{'largest child MB':>18}{'GPU MB':>10}"]
    for stage, path in stage_reports(root).items():
        report = read_report(root / path)
        peak = ((report or {}).get(PROVENANCE) or {}).get(PEAK_MEMORY)
        if peak is None:
            lines.append(f"{stage:<18}{'no report' if report is None else 'not recorded':>13}")
            continue
        ratio = f"{peak['rss_mb'] / weights_mb:.2f}" if weights_mb else "-"
        gpu = f"{peak['cuda_allocated_mb']:.0f}" if "cuda_allocated_mb" in peak else "-"
        lines.append(f"{stage:<18}{peak['rss_mb']:>13.0f}{ratio:>10}{peak['children_rss_mb']:>18.0f}{gpu:>10}")
    return "\n".join(lines)


def run_in_copy(params: dict, targets: list[str], work_dir: Path) -> Path:
    """The pipeline (or `targets` and what they depend on) run at `params` in a copy of the project."""
    project = work_dir / "project"
    copy_project(PROJECT, project)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    repro(project, work_dir / "dvc-repro.log", "stage memory", tuple(targets))
    return project


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workspace:
        print(memory_table(args.workspace))
        return
    params = planned_params(args)
    if args.dry_run:
        stages = f"{', '.join(args.until)} and the stages upstream" if args.until else ", ".join(stage_reports(PROJECT))
        changed = changed_knobs(params, load_params(PROJECT / "params.yaml"))
        print(f"would run {stages} in a copy of {PROJECT}, at params.yaml with {len(changed)} knobs changed:")
        for key, value in changed.items():
            print(f"  {key}: {json.dumps(value)}")
        return
    work_dir = (args.work_dir or Path(tempfile.mkdtemp(prefix="chatforge-stage-memory-"))).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        print(memory_table(run_in_copy(params, args.until, work_dir)))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
