"""The report card: one markdown page a person reads after `dvc repro`.

Each section reads the small JSON reports the stages wrote; a section whose input is missing says so
and the rest still render. Training curves are drawn from the dvclive TSV files as PNG images.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from chatforge.evaluation import MODELS as EVALUATED_MODELS
from chatforge.pr_report import read_tsv

PIPELINE = ["collect", "clean", "tokenizer", "tokenize", "pretrain", "sft", "preferences", "reward", "ppo", "dpo"]
PACKAGES = ["torch", "transformers", "trl", "datasets", "accelerate", "tokenizers", "dvc", "dvclive", "spacy",
            "nltk", "datasketch", "langdetect"]


def load(reports: Path, name: str) -> dict | None:
    path = reports / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def flatten(data: dict, prefix: str = "", depth: int = 2) -> dict:
    """Scalars of a nested report as dotted keys (lists and deeper levels are left out)."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 1:
            flat.update(flatten(value, f"{name}.", depth - 1))
        elif not isinstance(value, (dict, list)):
            flat[name] = value
    return flat


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def key_values(data: dict, skip: tuple[str, ...] = (), depth: int = 2) -> str:
    rows = [[key, value] for key, value in flatten(data, depth=depth).items() if not key.startswith(skip)]
    return table(["", "value"], rows)


def missing(what: str, stage: str) -> str:
    return f"_Not available: {what} is missing (run `dvc repro {stage}`)._"


def wall_time(report: dict) -> float | None:
    value = report.get("wall_seconds")
    return float(value) if isinstance(value, (int, float)) else None


def draw_curves(live_dir: Path, image: Path, title: str) -> bool:
    """All of a stage's dvclive metrics in one figure; False when there are none."""
    files = sorted((live_dir / "plots" / "metrics").rglob("*.tsv")) if live_dir.exists() else []
    series = [(path, *read_tsv(path.read_text(encoding="utf-8"))) for path in files]
    series = [s for s in series if s[1]]
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(series))
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False)
    for axis, (path, steps, values, name) in zip(axes.flat, series):
        axis.plot(steps, values, linewidth=1.2)
        axis.set_title(path.relative_to(live_dir / "plots" / "metrics").with_suffix("").as_posix(), fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(series):]:
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(image, dpi=90)
    plt.close(figure)
    return True


def curves(reports: Path, stage: str, figures: Path) -> str:
    image = figures / f"{stage}.png"
    if draw_curves(reports / "live" / stage, image, f"{stage} training curves"):
        return f"![{stage} curves]({image.relative_to(reports).as_posix()})"
    return missing(f"the {stage} curves (reports/live/{stage})", stage)


def section_data(reports: Path) -> str:
    parts = ["## Data"]
    collect, clean = load(reports, "collect.json"), load(reports, "clean.json")
    parts.append("### Collected" if collect else missing("reports/collect.json", "collect"))
    if collect:
        parts.append(key_values(collect, skip=("skipped.examples",)))
    parts.append("### Cleaned (the funnel: what came in, what was dropped and why, what was kept)" if clean
                 else missing("reports/clean.json", "clean"))
    if clean:  # three levels deep: dropped.<kind>.<step/reason> is the funnel
        parts.append(key_values(clean, skip=("dedup.document", "skipped_lines.examples"), depth=3))
    return "\n\n".join(parts)


def section_stage(reports: Path, figures: Path, stage: str, title: str, with_curves: bool) -> str:
    report = load(reports, f"{stage}.json")
    parts = [f"## {title}", key_values(report) if report else missing(f"reports/{stage}.json", stage)]
    if with_curves:
        parts.append(curves(reports, stage, figures))
    return "\n\n".join(parts)


EVAL_COLUMNS = [
    ("perplexity (all tokens)", "all_tokens.perplexity"),
    ("bits/byte (all)", "all_tokens.bits_per_byte"),
    ("n-gram bits/byte", "ngram.bits_per_byte"),
    ("perplexity (assistant)", "assistant_tokens.perplexity"),
    ("bits/byte (assistant)", "assistant_tokens.bits_per_byte"),
    ("reward score", "replies.reward_mean"),
    ("distinct-1", "replies.distinct_1"),
    ("distinct-2", "replies.distinct_2"),
    ("mean length", "replies.mean_length"),
    ("ended turn", "replies.end_of_turn_rate"),
    ("KL to SFT (nats/reply)", "replies.kl_to_sft"),
]


def section_eval(reports: Path) -> str:
    rows = []
    for model in EVALUATED_MODELS:
        report = load(reports, f"eval/{model}.json")
        flat = flatten(report) if report else {}
        rows.append([model] + [flat.get(key, "missing") for _, key in EVAL_COLUMNS])
    if all(row[1] == "missing" for row in rows):
        return "## Evaluation on the test split\n\n" + missing("reports/eval/*.json", "evaluate")
    return ("## Evaluation on the test split\n\nLower is better for perplexity and bits per byte; the n-gram "
            "baseline (Kneser-Ney on the same training text) is scored on the same test text for scale. Replies to "
            "the same held-out prompts are scored by the reward model; KL to SFT is summed over each reply.\n\n"
            + table(["model"] + [name for name, _ in EVAL_COLUMNS], rows))


def section_human_eval(reports: Path) -> str:
    results = load(reports, "human_eval/results.json")
    if not results:
        return "## Human evaluation\n\n" + missing("reports/human_eval/results.json", "human_eval")
    a, b = results["pair"]
    lines = [f"## Human evaluation: {a} vs {b}",
             f"{results['n']} ratings from {results['annotators']} annotators, {results['ties']} ties "
             "(blinded sheet: `reports/human_eval/sheet.html`; rate with `chatforge rate --annotator NAME`)."]
    if results["n"] == 0:
        lines.append("No ratings yet, so no human win rate is reported.")
    rows = []
    for name in (a, b):
        model = results["models"][name]
        interval = "n/a" if model["ci95"] is None else f"{model['ci95'][0]:.2f}–{model['ci95'][1]:.2f}"
        rows.append([name, model["wins"], model["win_rate"] if model["win_rate"] is not None else "n/a", interval,
                     results["reward_model"]["win_rate"][name] if results["reward_model"]["items"] else "n/a"])
    lines.append(table(["model", "human wins", "human win rate", "95% Wilson", "reward-model win rate"], rows))
    return "\n\n".join(lines)


def section_times(reports: Path) -> str:
    rows, total = [], 0.0
    for stage in PIPELINE:
        report = load(reports, f"{stage}.json")
        seconds = wall_time(report) if report else None
        rows.append([stage, seconds if seconds is not None else "n/a"])
        total += seconds or 0.0
    for model in EVALUATED_MODELS:
        report = load(reports, f"eval/{model}.json")
        seconds = wall_time(report) if report else None
        rows.append([f"evaluate@{model}", seconds if seconds is not None else "n/a"])
        total += seconds or 0.0
    rows.append(["**total**", total])
    return "## Time per stage (seconds, as each stage measured itself)\n\n" + table(["stage", "wall time"], rows)


def section_environment() -> str:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    versions = []
    for package in PACKAGES:
        try:
            versions.append([package, metadata.version(package)])
        except metadata.PackageNotFoundError:
            versions.append([package, "not installed"])
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    return "\n\n".join([
        "## Environment",
        f"git revision `{revision}`{dirty}; Python {platform.python_version()}; CPU {cpu} ({os.cpu_count()} cores); "
        f"GPU {gpu}.",
        table(["package", "version"], versions),
    ])


def build(reports: Path) -> str:
    figures = reports / "figures"
    sections = [
        "# chatforge report card",
        f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `dvc repro report`.",
        section_data(reports),
        section_stage(reports, figures, "tokenizer", "Tokenizer", with_curves=False),
        section_stage(reports, figures, "tokenize", "Token shards", with_curves=False),
        section_stage(reports, figures, "pretrain", "Pretraining", with_curves=True),
        section_stage(reports, figures, "sft", "Supervised fine-tuning", with_curves=True),
        section_stage(reports, figures, "preferences", "Preference pairs", with_curves=False),
        section_stage(reports, figures, "reward", "Reward model", with_curves=True),
        section_stage(reports, figures, "ppo", "PPO", with_curves=True),
        section_stage(reports, figures, "dpo", "DPO (implicit-reward accuracy on val pairs; held-out drift from SFT)",
                      with_curves=True),
        section_eval(reports),
        section_human_eval(reports),
        section_times(reports),
        section_environment(),
    ]
    return "\n\n".join(sections) + "\n"
