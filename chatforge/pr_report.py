"""The markdown a reviewer wants on a pull request: params diff, metrics diff and changed plots.

Plots are the dvclive TSV files kept in git under reports/live/; each one that differs from the base
revision is drawn as a PNG with the base and the current curve on the same axes.
"""
from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

from chatforge.errors import ChatforgeError

PLOTS_ROOT = "reports/live"


def git(*args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise ChatforgeError(f"git {' '.join(args)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout


def dvc_markdown(*args: str) -> str:
    result = subprocess.run(["dvc", *args, "--md"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ChatforgeError(f"dvc {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip() or "_no changes_"


def read_tsv(text: str) -> tuple[list[float], list[float], str]:
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    if not rows:
        return [], [], ""
    name = next(column for column in rows[0] if column not in ("step", "timestamp"))
    return [float(r["step"]) for r in rows], [float(r[name]) for r in rows], name


def changed_plots(base: str) -> list[tuple[str, str | None, str]]:
    """(path, text at base or None when new, current text) for each plot file that changed."""
    current = git("ls-files", "--", PLOTS_ROOT).split() + git(
        "ls-files", "--others", "--exclude-standard", "--", PLOTS_ROOT).split()
    changed = []
    for path in sorted(p for p in set(current) if p.endswith(".tsv")):
        now = Path(path).read_text(encoding="utf-8")
        before = subprocess.run(["git", "show", f"{base}:{path}"], capture_output=True, text=True)
        old = before.stdout if before.returncode == 0 else None
        if old != now:
            changed.append((path, old, now))
    return changed


def draw(path: str, old: str | None, now: str, out: Path, base: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.2))
    if old is not None:
        steps, values, _ = read_tsv(old)
        axes.plot(steps, values, label=base, color="#999999")
    steps, values, name = read_tsv(now)
    axes.plot(steps, values, label="this change", color="#1f77b4")
    axes.set_title(path.removeprefix(PLOTS_ROOT + "/"), fontsize=9)
    axes.set_xlabel("step")
    axes.set_ylabel(name)
    axes.legend(fontsize=8)
    figure.tight_layout()
    image = out / (path.removeprefix(PLOTS_ROOT + "/").replace("/plots/metrics/", "_").replace("/", "_")
                   .removesuffix(".tsv") + ".png")
    image.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(image, dpi=100)
    plt.close(figure)
    return image


def build(base: str, out_dir: Path) -> str:
    """Write the PNGs under out_dir and return the markdown (image links relative to out_dir)."""
    git("rev-parse", "--verify", "--quiet", f"{base}^{{commit}}")
    head = git("rev-parse", "--short", "HEAD").strip()
    lines = [f"# chatforge: this change against `{base}`", "", f"Revision `{head}`.", "",
             "## Params", "", dvc_markdown("params", "diff", base), "",
             "## Metrics", "", dvc_markdown("metrics", "diff", base), "", "## Changed plots", ""]
    plots = changed_plots(base)
    for path, old, now in plots:
        image = draw(path, old, now, out_dir / "plots", base)
        lines.append(f"![{path}]({image.relative_to(out_dir).as_posix()})")
    if not plots:
        lines.append("_no plot changed_")
    return "\n".join(lines) + "\n"
