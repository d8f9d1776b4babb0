"""The metrics a review compares: the numeric leaves of the metrics files dvc.yaml declares, and the params
sections each file depends on (its stage's and every upstream stage's).

Left out: where a stage ran and its peak memory (`provenance`), params a stage echoes back (`params`), and lists
(examples). Times (`*seconds`, `*per_second`) are metrics of the machine, not of the change: `is_timing` tells them
apart.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from chatforge.errors import ChatforgeError
from chatforge.provenance import KEY as PROVENANCE

NOT_METRICS = (PROVENANCE, "params")


def metric_files(root: Path = Path(".")) -> list[str]:
    """The `metrics:` files of dvc.yaml, as written there."""
    try:
        declared = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ChatforgeError(f"{root / 'dvc.yaml'}: cannot read it ({error.strerror})") from None
    return [str(path) for path in declared.get("metrics", [])]


def flatten(report: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves as dotted keys (`replies.reward_mean`); booleans as 0/1, so a flip shows as a change."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if not prefix and key in NOT_METRICS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float)):
            flat[name] = float(value)
    return flat


def is_timing(key: str) -> bool:
    """A time, at any level of the key (`wall_seconds`, `phase_seconds.records`, `samples_per_second`)."""
    return any(part.endswith(("seconds", "per_second")) for part in key.split("."))


def parse(text: str | None) -> dict | None:
    """A metrics file's JSON object; None when the file is missing or not a JSON object."""
    try:
        data = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def read_report(path: Path) -> dict | None:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except OSError:
        return None


def read_metrics(root: Path, files: list[str]) -> dict[str, dict[str, float]]:
    """file -> {dotted key: value} for each metrics file present under `root`."""
    found = {}
    for name in files:
        report = read_report(root / name)
        if report is not None:
            found[name] = flatten(report)
    return found


def sections_by_file(root: Path = Path(".")) -> dict[str, set[str]]:
    """Metrics file -> the params.yaml sections its stage and every stage upstream of it read (DVC's own graph,
    so matrix stages and `${…}` paths resolve as `dvc repro` resolves them)."""
    import networkx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph

        def own_sections(stage) -> set[str]:
            return {key.split(".")[0] for dep in stage.deps if hasattr(dep, "params") for key in dep.params}

        found = {}
        for stage in repo.index.stages:
            upstream = own_sections(stage).union(*(own_sections(s) for s in networkx.descendants(graph, stage)))
            for out in stage.outs:
                found[Path(out.fs_path).relative_to(Path(repo.root_dir)).as_posix()] = upstream
    return found
