"""The markdown a reviewer wants on a pull request: which metrics moved beyond noise, then params, times and peak
memory (resources, not judged) and plots.

Each metric that changed is judged against its spread over seeds (reports/noise.json, `chatforge noise`): within
noise when |Δ| is at most `sigmas` (DEFAULT_SIGMAS, 2√2) times σ, beyond it otherwise; beyond-noise changes come
first. σ is the seed spread widened for the few runs it was measured on (Student's t), and for a rate never less
than its binomial error, which also judges rates the noise file lacks (docs/review.md). The first line says when
the noise was measured on other hardware; the report says when the noise is missing or was measured at other params
for the sections a metric depends on, and when base and head ran on different hardware (stage reports'
`provenance`). Plots are the dvclive TSV files kept in git under reports/live/; each one that differs from the
base revision is drawn with both curves on the same axes.
"""
from __future__ import annotations

import csv
import io
import math
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chatforge import metrics, noise
from chatforge.errors import ChatforgeError
from chatforge.provenance import KEY as PROVENANCE
from chatforge.provenance import hardware, peak_rss_mb

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
    for path in sorted(p for p in set(current) if p.endswith(".tsv") and Path(p).exists()):  # deleted: no curve
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


# ---------------------------------------------------------------- metrics judged against noise

# Base and head are one run each, so under seed noise alone their difference spreads √2·σ: 2√2·σ is the 2-sigma
# band of that difference (a seed-only change crosses it 5% of the time per metric, 2σ would 16%; docs/review.md)
DEFAULT_SIGMAS = 2 * math.sqrt(2)
VERDICTS = ("beyond noise", "no noise measure", "within noise", "new", "removed")  # the table's order


@dataclass
class Change:
    file: str
    key: str
    base: float | None
    head: float | None
    spread: float | None  # the metric's std over the seed runs; None: not measured
    widening: float  # how much the few runs' std is widened (noise.seed_sigma_widening)
    stale: bool  # σ measured at other params for a section this metric depends on
    counts: tuple[int | None, int | None] = (None, None)  # for a rate, the items base's and head's value count

    @property
    def delta(self) -> float:
        return self.head - self.base

    @property
    def binomial(self) -> tuple[float, int] | None:
        """(σ, n) of a rate's sampling error, the larger of base's and head's; None when the metric is no rate."""
        sides = [(noise.binomial_sigma(value, count), count)
                 for value, count in zip((self.base, self.head), self.counts) if value is not None and count]
        return max(sides) if sides else None

    @property
    def seed_sigma(self) -> float | None:
        return None if self.spread is None else self.spread * self.widening

    @property
    def sigma(self) -> float | None:
        """The σ a change is judged against: the widened seed spread, but never below a rate's sampling error."""
        binomial = self.binomial
        known = [sigma for sigma in (self.seed_sigma, binomial[0] if binomial else None) if sigma is not None]
        return max(known) if known else None

    @property
    def sigmas(self) -> float:
        """|Δ| in units of σ (infinite when the metric never moved with the seed)."""
        return abs(self.delta) / self.sigma if self.sigma else math.inf

    def verdict(self, band: float) -> str:
        if self.base is None:
            return "new"
        if self.head is None:
            return "removed"
        if self.sigma is None:
            return "no noise measure"
        return "within noise" if abs(self.delta) <= band * self.sigma else "beyond noise"

    def sigma_source(self) -> str:
        """Where σ came from: the seed runs (and the widening) or a rate's binomial error."""
        if self.sigma is None:
            return ""
        if self.binomial and self.sigma == self.binomial[0]:
            alone = "; no seed σ" if self.spread is None else ""
            return f"binomial, n {self.binomial[1]}{alone}"
        return f"seeds {number(self.spread)} ×{self.widening:.3g}"


def report_name(file: str) -> str:
    return file.removeprefix("reports/").removesuffix(".json")


def label(file: str, key: str) -> str:
    return f"{report_name(file)}: {key}"


def number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def changes(base: dict[str, dict], head: dict[str, dict], measured: dict | None, stale_files: set[str],
            band: float) -> list[Change]:
    """Every metric whose value differs between base and head (times left out: they are the machine's)."""
    spread = measured["metrics"] if measured else {}
    widening = noise.seed_sigma_widening(len(measured["seeds"]), band) if measured else 1.0
    found = []
    for file in sorted(set(base) | set(head)):
        before, after = metrics.flatten(base.get(file) or {}), metrics.flatten(head.get(file) or {})
        base_counts, head_counts = (noise.rate_counts(file, reports.get(file) or {}) for reports in (base, head))
        for key in sorted(set(before) | set(after)):
            if metrics.is_timing(key) or before.get(key) == after.get(key):
                continue
            stats = spread.get(file, {}).get(key)
            found.append(Change(file, key, before.get(key), after.get(key), stats["std"] if stats else None,
                                widening, file in stale_files, (base_counts.get(key), head_counts.get(key))))
    return found


def metrics_table(found: list[Change], band: float) -> str:
    def order(change: Change):
        verdict = change.verdict(band)
        return VERDICTS.index(verdict), -change.sigmas if verdict in ("beyond noise", "within noise") else 0

    rows = ["| metric | base | this change | Δ | σ | verdict |", "|---|---|---|---|---|---|"]
    for change in sorted(found, key=order):
        verdict = change.verdict(band)
        if verdict in ("beyond noise", "within noise"):
            verdict = f"{'**beyond noise**' if verdict == 'beyond noise' else verdict} ({number(change.sigmas)}σ)"
        delta = number(change.delta, signed=True) if verdict not in ("new", "removed") else "—"
        sigma = f"{number(change.sigma)} ({change.sigma_source()})" if change.sigma is not None else "—"
        rows.append(f"| {label(change.file, change.key)} | {number(change.base)} | {number(change.head)} | {delta} | "
                    f"{sigma}{' (stale)' if change.stale and change.spread is not None else ''} | {verdict} |")
    return "\n".join(rows)


def headline(found: list[Change], measured: dict | None, band: float) -> str:
    verdicts = [change.verdict(band) for change in found]
    beyond, within = verdicts.count("beyond noise"), verdicts.count("within noise")
    if measured is None:
        return (f"**No noise measurement**: `{noise.NOISE_FILE}` is missing, so of the {len(found)} changed metrics "
                f"only the {beyond + within} rates are judged, against {band:.3g}× their binomial error ({beyond} "
                "beyond noise); the others are listed without a verdict. Measure it with `chatforge noise --seeds 5` "
                "and commit it.")
    runs = len(measured["seeds"])
    rule = (f"{band:.3g}σ, where σ is the spread over {runs} seeds widened for so few runs (Student's t) and, for a "
            "rate, at least its binomial error")
    unjudged = len(found) - beyond - within
    unjudged_note = f" {unjudged} of them without a noise measure (new, removed or not measured)." if unjudged else ""
    if not beyond:
        return f"**No change beyond noise**: {len(found)} metrics changed, none by more than {rule}.{unjudged_note}"
    return f"**{beyond} of {len(found)} changed metrics moved beyond noise**: more than {rule}.{unjudged_note}"


# ---------------------------------------------------------------- staleness and hardware

def params_at(text: str | None) -> dict:
    """params.yaml's sections parsed as the stages parse them (YAML 1.2 floats), or {} when absent."""
    from chatforge.params import load_params

    if text is None:
        return {}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        return load_params(path)


def describe(machine: dict) -> str:
    return f"{machine['cpu']} (bf16: {machine['bf16_path']}, device: {machine['device']})"


def hardware_notes(base: dict[str, dict], head: dict[str, dict]) -> list[str]:
    """Warnings when base and head ran on different machines or package versions."""
    notes, differing, unrecorded, packages = [], {}, [], {}
    for file in sorted(set(base) & set(head)):
        before, after = hardware(base[file]), hardware(head[file])
        if before is None and after is not None:
            unrecorded.append(file)
        elif before and after and before != after:
            differing.setdefault((describe(before), describe(after)), []).append(report_name(file))
        for name, old in (base[file].get(PROVENANCE) or {}).get("packages", {}).items():
            new = (head[file].get(PROVENANCE) or {}).get("packages", {}).get(name)
            if new and new != old:
                packages[name] = f"{name} {old} → {new}"
    for (before, after), files in differing.items():
        notes.append(f"**Different hardware**: base ran on {before}, this change on {after} ({', '.join(files)}). "
                     "bf16 kernels round differently per CPU, and the difference grows downstream: these metrics "
                     "may move beyond the seed noise for that reason alone.")
    if unrecorded:
        notes.append(f"Base's reports do not record where they ran ({len(unrecorded)} of them, made before "
                     "provenance was recorded), so a hardware difference cannot be ruled out.")
    if packages:
        notes.append("**Different package versions**: " + ", ".join(sorted(packages.values())) + ".")
    return notes


def noise_elsewhere(head: dict[str, dict], measured: dict | None) -> str | None:
    """The report's first line when the noise was measured on other hardware than head's stage reports ran on:
    σ is then another machine's seed noise, and every verdict only indicative."""
    noise_machine = hardware(measured) if measured else None
    if noise_machine is None:
        return None
    others = {describe(machine) for report in head.values()
              if (machine := hardware(report)) not in (None, noise_machine)}
    if not others:
        return None
    return (f"**⚠️ Verdicts only indicative: the noise was measured on other hardware.** `{noise.NOISE_FILE}` "
            f"comes from {describe(noise_machine)}, this change ran on {', '.join(sorted(others))}; bf16 kernels "
            "round differently per CPU, so its σ is not this machine's seed noise. Measure it here with "
            "`chatforge noise`.")


# ---------------------------------------------------------------- the report

def at_revision(revision: str, path: str) -> str | None:
    shown = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def build(base: str, out_dir: Path, band: float = DEFAULT_SIGMAS) -> str:
    """Write the PNGs under out_dir and return the markdown (image links relative to out_dir)."""
    git("rev-parse", "--verify", "--quiet", f"{base}^{{commit}}")
    head_revision = git("rev-parse", "--short", "HEAD").strip()
    files = metrics.metric_files()
    base_reports = {f: r for f in files if (r := metrics.parse(at_revision(base, f))) is not None}
    head_reports = {f: r for f in files if (r := metrics.read_report(Path(f))) is not None}
    measured = noise.load() or noise.parse(at_revision(base, noise.NOISE_FILE.as_posix()))
    stale_files: set[str] = set()
    notes = hardware_notes(base_reports, head_reports)
    if measured:
        stale = noise.stale_sections(measured, params_at(at_revision(base, "params.yaml")),
                                     params_at(Path("params.yaml").read_text(encoding="utf-8")))
        stale_files = {f for f, sections in metrics.sections_by_file().items() if sections & stale}
        if stale:
            notes.append(f"**Stale noise**: `{noise.NOISE_FILE}` was measured at other params for "
                         f"{', '.join(f'`{s}`' for s in sorted(stale))}, so σ of the metrics that depend on them "
                         "(marked stale) may not hold; re-measure with `chatforge noise`.")
    found = changes(base_reports, head_reports, measured, stale_files, band)
    elsewhere = noise_elsewhere(head_reports, measured)
    lines = [elsewhere, ""] if elsewhere else []
    lines += [f"# chatforge: this change against `{base}`", "", f"Revision `{head_revision}`.", "",
              headline(found, measured, band), ""]
    lines += [f"> {note}\n" for note in notes]
    lines += ["## Metrics", "", metrics_table(found, band) if found else "_no metric changed_", "",
              "## Params", "", dvc_markdown("params", "diff", base), "",
              "## Time and peak memory per stage (the machine's, not judged against noise)", "",
              resources_table(base_reports, head_reports), "", "## Changed plots", ""]
    plots = changed_plots(base)
    for path, old, now in plots:
        image = draw(path, old, now, out_dir / "plots", base)
        lines.append(f"![{path}]({image.relative_to(out_dir).as_posix()})")
    if not plots:
        lines.append("_no plot changed_")
    return "\n".join(lines) + "\n"


def resources_table(base: dict[str, dict], head: dict[str, dict]) -> str:
    """Per stage report, its wall time and peak resident memory at base and head, side by side."""
    rows = ["| report | seconds, base | seconds, this change | peak RSS MB, base | peak RSS MB, this change |",
            "|---|---|---|---|---|"]
    for file in sorted(set(base) | set(head)):
        before, after = base.get(file) or {}, head.get(file) or {}
        cells = [before.get("wall_seconds"), after.get("wall_seconds"), peak_rss_mb(before), peak_rss_mb(after)]
        if any(value is not None for value in cells):
            rows.append(f"| {report_name(file)} | {' | '.join(number(value) for value in cells)} |")
    return "\n".join(rows) if len(rows) > 2 else "_no stage recorded its time or memory_"
