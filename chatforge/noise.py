"""Measure the noise of the metrics: the pipeline run N times with every `seed` in params.yaml moved together.

The runs happen in a copy of the project (its git-tracked and untracked-but-not-ignored files, as a queued DVC
experiment would see them) with its own DVC cache, so the workspace, its outputs and its lock stay untouched.
Run i adds i to every seed (run 0 is the params as they are). Run 0 is the workspace's own run when that run is
already there: `dvc status` clean at these very params, and every metrics file made with this machine's hardware
and packages (reruns on one machine are bit-identical, so running it again would only cost time). The result,
reports/noise.json, gives per metric the mean, std, min and max across the runs, and per params section a hash of
that section without its seeds: a review (pr_report.py) trusts a metric's spread only while every section the
metric depends on still hashes the same, widens it for having been measured on few runs, and never lets a rate
be judged less noisy than its own sampling error (`seed_sigma_widening`, `binomial_sigma`, `rate_counts`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import yaml

from chatforge.console import log
from chatforge.errors import ChatforgeError
from chatforge.metrics import flatten, is_timing, metric_files, read_metrics, read_report
from chatforge.metrics import parse as parse_json
from chatforge.params import load_params, parse_yaml
from chatforge.provenance import KEY as PROVENANCE
from chatforge.provenance import hardware, provenance

SEED = "seed"
NOISE_FILE = Path("reports/noise.json")
# what a run needs besides the pipeline's own files; outputs and old reports would only be rebuilt
NOT_COPIED = ("reports/", "tests/", "benchmarks/", "dvc.lock")


# ---------------------------------------------------------------- params: seeds, overrides, hashes

def seed_keys(params, prefix: str = "") -> dict[str, int]:
    """Every `seed` key in params (inside mappings and lists), as dotted paths: {"sft.seed": 0, ...}."""
    items = params.items() if isinstance(params, dict) else enumerate(params) if isinstance(params, list) else ()
    found = {}
    for key, value in items:
        path = f"{prefix}{key}"
        if key == SEED and isinstance(value, int) and not isinstance(value, bool):
            found[path] = value
        else:
            found.update(seed_keys(value, f"{path}."))
    return found


def set_key(params: dict, dotted: str, value) -> None:
    """Set `a.b.c` (list items by index) in place; missing mappings on the way are created."""
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def with_overrides(params: dict, overrides: list[str]) -> dict:
    """params with `section.key=value` overrides (values in YAML: `sft.lora={r: 4}`, `model.init=null`)."""
    changed = copy.deepcopy(params)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ChatforgeError(f"override {override!r}: write it as section.key=value")
        set_key(changed, key.strip(), parse_yaml(value))
    return changed


def merged(params: dict, profile: dict) -> dict:
    """params with a profile's nested knobs laid over them (profiles/*.yaml)."""
    result = copy.deepcopy(params)
    for key, value in profile.items():
        result[key] = merged(result.get(key) or {}, value) if isinstance(value, dict) else value
    return result


def with_seed_offset(params: dict, offset: int) -> dict:
    moved = copy.deepcopy(params)
    for key, value in seed_keys(params).items():
        set_key(moved, key, value + offset)
    return moved


def section_hashes(params: dict) -> dict[str, str]:
    """Per params section, a short hash of its knobs without its seeds: a seed change keeps the noise valid."""
    hashes = {}
    for name, section in params.items():
        unseeded = copy.deepcopy(section)
        for key in seed_keys(section):
            set_key(unseeded, key, None)
        text = json.dumps(unseeded, sort_keys=True, default=str)
        hashes[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return hashes


def params_hash(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def stale_sections(measured: dict, *params_sets: dict) -> set[str]:
    """Sections whose knobs (seeds aside) match none of `params_sets` as the noise `measured` was measured."""
    hashes = [section_hashes(params) for params in params_sets]
    return {name for name in set().union(*hashes)
            if measured["section_hashes"].get(name) not in {each.get(name) for each in hashes}}


# ---------------------------------------------------------------- statistics

def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def aggregate(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """file -> key -> mean/std/min/max over the runs, for the metrics every run reported (times left out: they
    measure the machine's load, not the seed)."""
    files = set.intersection(*(set(run) for run in runs)) if runs else set()
    result = {}
    for name in sorted(files):
        keys = set.intersection(*(set(run[name]) for run in runs))
        result[name] = {key: spread([run[name][key] for run in runs]) for key in sorted(keys) if not is_timing(key)}
    return result


def seed_sigma_widening(runs: int, band: float) -> float:
    """The factor that widens a σ measured over `runs` runs so that judging |Δ| ≤ band·σ keeps the false-alarm
    rate it has for a known σ. Base and head are one run each, so under seed noise Δ/(√2·σ) is normal; with σ
    estimated from the runs, Δ/(√2·s) follows Student's t with runs − 1 degrees of freedom (its tails are wider:
    at 5 runs an s of half the true σ is not rare)."""
    from scipy.stats import norm, t

    z = band / math.sqrt(2)
    return float(t.ppf(norm.cdf(z), runs - 1) / z)


def binomial_sigma(rate: float, count: int) -> float:
    """The sampling error of a proportion measured on `count` items: no seed spread can make it smaller."""
    return math.sqrt(rate * (1 - rate) / count)


# Rates in reports that predate the {"accuracy": p, "n": N} convention: (report, key, key of its count), where *
# stands for one key segment and, in the count's key, for what it matched. reward's and dpo's accuracy_by_origin.*
# record no count: they get no floor
RATE_COUNTS = (
    ("reports/tokenizer.json", "val.roundtrip_exact", "val.texts"),
    ("reports/ppo.json", "win_rate", "heldout_prompts"),
    ("reports/ppo.json", "*_end_of_turn_rate", "heldout_prompts"),
    ("reports/dpo.json", "*_end_of_turn_rate", "heldout_prompts"),
    ("reports/dpo.json", "accuracy", "val_pairs.pairs"),
    ("reports/dpo.json", "accuracy_by_strategy.*", "pairs_by_strategy.*"),
    ("reports/reward.json", "accuracy", "val_pairs"),
    ("reports/reward.json", "accuracy_by_strategy.*", "pairs_by_strategy.*"),
    ("reports/eval/*.json", "replies.end_of_turn_rate", "replies.prompts"),
    ("reports/human_eval/results.json", "reward_model.win_rate.*", "reward_model.items"),
    ("reports/human_eval/results.json", "models.*.win_rate", "n"),  # n counts ties too: a floor a little low
)


def counts_by_convention(report: dict, prefix: str = "") -> dict[str, int]:
    """A float in [0, 1] beside an integer `n` in the same mapping is a rate over n items (IFEval's
    {"accuracy", "n", "low", "high"}); integers beside it (ties, annotators) are counts, not rates."""
    count = report.get("n")
    found = {}
    for key, value in report.items():
        if isinstance(value, dict):
            found.update(counts_by_convention(value, f"{prefix}{key}."))
        elif type(count) is int and count > 0 and isinstance(value, float) and 0 <= value <= 1:
            found[f"{prefix}{key}"] = count
    return found


def rate_counts(file: str, report: dict) -> dict[str, int]:
    """Dotted metric key -> the number of items it is a proportion of, for every rate of a metrics file."""
    counts = counts_by_convention(report)
    flat = flatten(report)
    for pattern, rate_key, count_key in RATE_COUNTS:
        if not fnmatch(file, pattern):
            continue
        matcher = re.compile(re.escape(rate_key).replace(r"\*", "([^.]+)"))
        for key in flat:
            matched = matcher.fullmatch(key)
            count = flat.get(matched.expand(count_key.replace("*", r"\1"))) if matched else None
            if count:
                counts[key] = int(count)
    return counts


# ---------------------------------------------------------------- running

def copy_project(source: Path, target: Path) -> None:
    """The project's files (tracked, and untracked but not ignored) into `target`, as a fresh git + DVC repo."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=source,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise ChatforgeError(f"{source}: not a git repository (chatforge noise copies the project's git files)")
    for name in filter(None, listed.stdout.split("\0")):
        if name.startswith(NOT_COPIED) or not (source / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)
    git = ["git", "-c", "user.email=noise@chatforge", "-c", "user.name=chatforge noise"]
    for command in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "noise measurement"]):
        subprocess.run(command, cwd=target, check=True, capture_output=True)


def dvc_command() -> str:
    beside = Path(sys.executable).parent / "dvc"  # the venv's dvc, even when the venv is not activated
    return str(beside) if beside.exists() else "dvc"


def repro(project: Path, log_file: Path, label: str, targets: tuple[str, ...] = ()) -> float:
    """`dvc repro` in `project` (of `targets` and what they depend on; every stage without), its output appended to
    `log_file`; the seconds it took."""
    start = time.perf_counter()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    with open(log_file, "a", encoding="utf-8") as sink:
        process = subprocess.Popen([dvc_command(), "repro", *targets], cwd=project, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:
            sink.write(line)
            stage = re.match(r"Running stage '([^']+)'", line)
            if stage:
                log("noise", f"{label}: {stage.group(1)}")
        if process.wait() != 0:
            raise ChatforgeError(f"{label}: dvc repro failed; its output is in {log_file}")
    return time.perf_counter() - start


def workspace_run(root: Path, params: dict, files: list[str]) -> dict | None:
    """Run 0 as the workspace already holds it ({"metrics", "seconds"}), or None when it must be run: params
    differ from params.yaml (a profile or override), a stage is out of date, or a report is missing or was made
    on other hardware or packages."""
    if params != load_params(root / "params.yaml"):
        return None
    status = subprocess.run([dvc_command(), "status", "--json"], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if status.returncode != 0 or parse_json(status.stdout) != {}:
        return None
    here = provenance()
    machine = hardware({PROVENANCE: here})
    reports = {name: read_report(root / name) for name in files}
    if not reports or any(report is None or hardware(report) != machine
                          or report[PROVENANCE].get("packages") != here["packages"] for report in reports.values()):
        return None
    seconds = sum(report.get("wall_seconds", 0.0) for report in reports.values())
    return {"metrics": {name: flatten(report) for name, report in reports.items()}, "seconds": seconds}


def measure(root: Path, seeds: int, params: dict, work_dir: Path) -> dict:
    """Run the pipeline `seeds` times at `params` (seeds moved by 0..seeds-1) in a copy under `work_dir`;
    the content of reports/noise.json."""
    keys = seed_keys(params)
    if not keys:
        raise ChatforgeError("params.yaml has no `seed` key, so there is no seed to move")
    project = work_dir / "project"
    copy_project(root, project)
    files = metric_files(project)
    runs, metrics = [], []
    for offset in range(seeds):
        label = f"seed run {offset + 1}/{seeds} (seeds +{offset})"
        reused = workspace_run(root, params, files) if offset == 0 else None
        if reused is not None:
            metrics.append(reused["metrics"])
            runs.append({"offset": offset, "seconds": round(reused["seconds"], 1), "workspace": True})
            log("noise", f"{label}: the workspace's own run (up to date, made on this hardware), not run again")
            continue
        (project / "params.yaml").write_text(yaml.safe_dump(with_seed_offset(params, offset), sort_keys=False),
                                             encoding="utf-8")
        seconds = repro(project, work_dir / "dvc-repro.log", label)
        metrics.append(read_metrics(project, files))
        runs.append({"offset": offset, "seconds": round(seconds, 1)})
        log("noise", f"{label}: done in {seconds / 60:.1f} min")
    hashes = section_hashes(params)
    return {
        "seeds": list(range(seeds)),
        "seed_keys": keys,
        "params_hash": params_hash(hashes),
        "section_hashes": hashes,
        "runs": runs,
        "metrics": aggregate(metrics),
        "provenance": provenance(),
    }


def checked(data: dict | None) -> dict | None:
    """A noise measurement, or None when `data` is not one."""
    return data if data is not None and {"metrics", "section_hashes"} <= set(data) else None


def load(path: Path = NOISE_FILE) -> dict | None:
    return checked(read_report(path))


def parse(text: str | None) -> dict | None:
    return checked(parse_json(text))
