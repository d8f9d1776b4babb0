"""The report card: one markdown page a person reads in 30 seconds (the summary), then the details.

The summary gives the data funnel, the model's size and training tokens, each stage's headline metric with its
verdict against its baseline (and the seed-noise band from reports/noise.json where it was measured at these
params), each chat model's in-domain verdicts beside its general ability (IFEval against the pretrained start) and
the wall time; then the models' replies to the same 8 test prompts side by side, then per-stage tables with
readable labels.
Each section reads the small JSON reports the stages wrote; a section whose input is missing says which stage
to run and the rest still render. Figures (the cleaning funnel, training curves) are PNGs under figures/.
"""
from __future__ import annotations

import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from chatforge import noise as noise_file
from chatforge.errors import ChatforgeError
from chatforge.evaluation import MODELS as EVALUATED_MODELS
from chatforge.files import read_jsonl
from chatforge.params import PARAMS_FILE, load_params
from chatforge.pr_report import read_tsv
from chatforge.provenance import KEY as PROVENANCE
from chatforge.provenance import PEAK_MEMORY, peak_rss_mb, provenance

PIPELINE = ["collect", "clean", "tokenizer", "tokenize", "pretrain", "sft", "preferences", "reward", "ppo", "dpo"]
REPLY_PROMPTS = 8
# the clean stage's steps in the order they run (stages/clean.py): the funnel's order
CLEAN_STEPS = ["structure", "normalize", "pii", "quality", "language", "exact_dedup", "near_dedup"]


# ---------------------------------------------------------------- small helpers

def load(reports: Path, name: str) -> dict | None:
    try:
        return json.loads((reports / name).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def get(report: dict | None, path: str):
    """`a.b.c` of a nested report, or None."""
    for part in path.split("."):
        if not isinstance(report, dict):
            return None
        report = report.get(part)
    return report


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "n/a"}[value]
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def compact(count: float) -> str:
    """1,515,520 → 1.52M; 283,051 → 283K."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= size:
            return f"{count / size:.3g}{suffix}"
    return f"{count:,.0f}"


def cell(text) -> str:
    """Text safe inside a markdown table cell."""
    return fmt(text).replace("|", "\\|").replace("\n", "<br>")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def readable(key: str) -> str:
    """`language/hint_not_allowed` → `language: hint not allowed`."""
    return key.replace("/", ": ").replace("_", " ")


def labelled(report: dict, rows: list[tuple[str, str]]) -> str:
    """A two-column table of (label, dotted path) rows the report has."""
    present = [[name, get(report, path)] for name, path in rows if get(report, path) is not None]
    return table(["", "value"], present)


def missing(what: str, stage: str) -> str:
    return f"_Not available: {what} is missing (run `dvc repro {stage}`)._"


def wall_time(report: dict | None) -> float | None:
    value = (report or {}).get("wall_seconds")
    return float(value) if isinstance(value, (int, float)) else None


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- the summary

def length_baselines(pairs_file: Path | None) -> dict | None:
    """Accuracy of "the longer reply wins" and "the shorter reply wins" on the val pairs (ties left out): what a
    reward model scores by length alone."""
    if pairs_file is None or not pairs_file.exists():
        return None
    lengths = [(len(p["chosen"][-1]["content"]), len(p["rejected"][-1]["content"])) for p in read_jsonl(pairs_file)]
    decided = [chosen > rejected for chosen, rejected in lengths if chosen != rejected]
    if not decided:
        return None
    longer = sum(decided) / len(decided)
    return {"longer": longer, "shorter": 1 - longer}


def noise_band(measured: dict | None, file: str, key: str) -> str:
    stats = (measured or {}).get("metrics", {}).get(file, {}).get(key)
    return f"±{2 * stats['std']:.3g}" if stats else "not measured"


def verdict(good: bool | None, text: str) -> str:
    return f"{'✅' if good else '❌'} {text}" if good is not None else text


def ratio_text(value: float, baseline: float, lower_is_better: bool) -> str:
    change = (baseline - value) / baseline if lower_is_better else (value - baseline) / baseline
    return f"{abs(change):.1%} {'better' if change > 0 else 'worse'}"


def headline_rows(reports: Path, pairs_file: Path | None, measured: dict | None) -> list[list]:
    """[stage, metric, value, baseline, verdict, noise band] for each stage that has run; without a noise
    measurement that holds for these params (`measured` None), no band."""
    def band(file: str, key: str) -> list[str]:
        return [noise_band(measured, file, key)] if measured else []

    rows = []
    pretrain, sft, reward, ppo, dpo = (load(reports, f"{name}.json") for name in ("pretrain", "sft", "reward", "ppo",
                                                                                    "dpo"))
    if pretrain:
        model, ngram = pretrain["val_bits_per_byte"], pretrain["ngram_val_bits_per_byte"]
        rows.append(["pretrain", "val bits/byte", model, f"{pretrain.get('ngram_order', '')}-gram {ngram:.4g}",
                     verdict(model < ngram, ratio_text(model, ngram, lower_is_better=True) + " than the n-gram"),
                     *band("reports/pretrain.json", "val_bits_per_byte")])
    if sft:
        after, before = get(sft, "val_after.bits_per_byte"), get(sft, "val_before.bits_per_byte")
        rows.append(["sft", "assistant bits/byte (val)", after, f"base {before:.4g}",
                     verdict(after < before, ratio_text(after, before, lower_is_better=True) + " than base"),
                     *band("reports/sft.json", "val_after.bits_per_byte")])
    baselines = length_baselines(pairs_file)
    for name, report in (("reward", reward), ("dpo", dpo)):
        if not report:
            continue
        accuracy = report["accuracy"]
        if baselines:
            best = max(baselines.values())
            against = f"longer wins {baselines['longer']:.3f} / shorter wins {baselines['shorter']:.3f}"
            judged = verdict(accuracy > best, f"{accuracy - best:+.3f} over the better length rule")
        else:
            against, judged = "length rules n/a", "n/a"
        what = "val pair accuracy" if name == "reward" else "implicit-reward val pair accuracy"
        rows.append([name, what, accuracy, against, judged, *band(f"reports/{name}.json", "accuracy")])
    budget = (ppo or {}).get("kl_budget")
    if ppo:
        rows.append(["ppo", "win rate vs SFT (reward model)", ppo["win_rate"], "0.5 (a tie)",
                     verdict(ppo["win_rate"] > 0.5, f"{ppo['win_rate']:.1%} of held-out prompts"),
                     *band("reports/ppo.json", "win_rate")])
    for name, report, key in (("ppo", ppo, "kl_to_reference"), ("dpo", dpo, "kl_to_sft")):
        if report and key in report:
            kl = report[key]
            judged = verdict(kl <= budget, "within the budget" if kl <= budget else "over the budget") \
                if budget is not None else "no budget (ppo.kl_budget)"
            rows.append([name, "KL to SFT (nats/reply)", kl, f"budget {fmt(budget)}", judged,
                         *band(f"reports/{name}.json", key)])
    return rows


def funnel_line(collect: dict | None, clean: dict | None) -> str:
    parts = []
    if collect:
        sources = collect.get("sources", {})
        written = get(collect, "totals.written") or {}
        parts.append(f"{fmt(get(collect, 'totals.read'))} records read from {len(sources)} sources "
                     f"({', '.join(sources)}) → " + ", ".join(f"{fmt(n)} {kind}" for kind, n in written.items() if n)
                     + " collected")
    if clean:
        drops = dropped_by_reason(clean)
        top = sorted(drops.items(), key=lambda item: -item[1])[:3]
        kept = get(clean, "output.conversation") or {}
        parts.append(f"{fmt(clean.get('dropped_total'))} dropped in cleaning (most: "
                     + ", ".join(f"{readable(reason)} {fmt(n)}" for reason, n in top) + ") → "
                     f"{fmt(sum(kept.values()))} conversations kept ("
                     + ", ".join(f"{split} {fmt(n)}" for split, n in kept.items()) + ")")
    return " → ".join(parts) if parts else missing("reports/collect.json and clean.json", "clean")


def model_line(pretrain: dict | None, sft: dict | None) -> str:
    if not pretrain:
        return missing("reports/pretrain.json", "pretrain")
    seen, train = pretrain.get("tokens_seen"), pretrain.get("train_tokens")
    passes = f" ({seen / train:.1f} passes over {compact(train)} training tokens)" if seen and train else ""
    line = (f"{compact(pretrain['parameters'])} parameters ({pretrain.get('init', 'scratch')}), pretrained on "
            f"{compact(seen or 0)} tokens{passes}")
    if sft:
        line += f"; fine-tuned on {compact(sft.get('assistant_tokens_trained', 0))} assistant tokens in {fmt(sft.get('steps'))} steps"
    return line


def total_seconds(reports: Path) -> float:
    names = [f"{stage}.json" for stage in PIPELINE] + [f"eval/{model}.json" for model in EVALUATED_MODELS]
    return sum(wall_time(load(reports, name)) or 0.0 for name in names)


# ---------------------------------------------------------------- general ability: IFEval against the start

GENERAL_FIGURE = "prompt_level_strict"  # the summary's figure: prompts whose every instruction was followed, strictly
IFEVAL_FIGURES = [("prompt-level strict", "prompt_level_strict"), ("instruction-level strict",
                  "instruction_level_strict"), ("prompt-level loose", "prompt_level_loose"),
                  ("instruction-level loose", "instruction_level_loose")]
MODEL_OF_STAGE = {"pretrain": "base", "sft": "sft", "ppo": "ppo", "dpo": "dpo"}  # the reward model does not chat


def eval_reports(reports: Path) -> dict[str, dict | None]:
    """Each evaluated model's report by name; the init first where it has figures of its own (not when base is the
    init, pretrain.max_steps 0, whose report only says so)."""
    found = {model: load(reports, f"eval/{model}.json") for model in ("init", *EVALUATED_MODELS)}
    init = found["init"]
    if not init or init.get("same_as") or not {"all_tokens", "ifeval"} & set(init):
        del found["init"]
    return found


def general_reference(reports: Path) -> tuple[str, str] | None:
    """(model, why) whose IFEval figures the others are judged against: the pretrained start, or base where base is
    the start (pretrain.max_steps 0) or there is none (scratch); None while reports/eval/init.json is missing."""
    init = load(reports, "eval/init.json")
    if init is None:
        return None
    if init.get("scratch"):
        return "base", "no pretrained start (scratch init)"
    if init.get("same_as"):
        return init["same_as"], "the init itself (pretrain.max_steps is 0)"
    return "init", "the pretrained start"


def percent(rate: float) -> str:
    return f"{rate:.1%}"


def interval(figure: dict) -> str:
    return f"{figure['low'] * 100:.1f}–{figure['high'] * 100:.1f}%"


def general_ability(figure: dict, reference: str, start: dict) -> str:
    """A model's IFEval accuracy against the reference's, in plain words: below the low end of the reference's 95%
    interval is ❌, a loss that the sampling of the prompts does not explain."""
    text = (f"IFEval {percent(start['accuracy'])} → {percent(figure['accuracy'])} ({reference} 95% interval "
            f"{interval(start)})")
    if figure["accuracy"] < start["low"]:
        return verdict(False, f"{text}: instruction following lost")
    return verdict(True, f"{text}: {'gained' if figure['accuracy'] > start['high'] else 'within the interval'}")


def general_cell(model: str, ifeval: dict, reference: str | None, why: str | None, start: dict | None) -> str:
    figure = ifeval.get(GENERAL_FIGURE)
    if figure is None:
        return f"IFEval skipped: {ifeval.get('skipped', 'no prompt-level strict figure')}"
    alone = f"IFEval {percent(figure['accuracy'])} ({interval(figure)})"
    if model == reference:
        return f"{alone}: the reference, {why}"
    if start is None:
        return f"{alone}: no reference to judge it against"
    return general_ability(figure, reference, start)


def mark(cell: str) -> bool | None:
    """The verdict a summary cell starts with: ✅ True, ❌ False, neither None."""
    return {"✅": True, "❌": False}.get(cell[:1])


def general_ability_summary(reports: Path, rows: list[list]) -> str:
    """Per chat model, its in-domain verdicts (the stage rows) beside its general ability, and an overall verdict
    that is ❌ when either is, so an in-domain ✅ never hides a loss; one line when IFEval did not run."""
    ifevals = {model: report["ifeval"] for model, report in eval_reports(reports).items() if get(report, "ifeval")}
    figures = {model: ifeval[GENERAL_FIGURE] for model, ifeval in ifevals.items() if GENERAL_FIGURE in ifeval}
    if not figures:
        reasons = sorted({ifeval["skipped"] for ifeval in ifevals.values() if "skipped" in ifeval})
        return (f"**General ability**: IFEval skipped ({'; '.join(reasons)})." if reasons else
                "**General ability**: not measured (no IFEval figures in reports/eval/*.json; run `dvc repro "
                "evaluate`).")
    reference, why = general_reference(reports) or (None, None)
    start = figures.get(reference)
    table_rows = []
    for model, ifeval in ifevals.items():
        if model == "init" and reference != "init":
            continue  # a scratch start's random weights: base is the reference
        in_domain = [row for row in rows if MODEL_OF_STAGE.get(row[0]) == model]
        general = general_cell(model, ifeval, reference, why, start)
        marks = [mark(row[4]) for row in in_domain] + [mark(general)]
        overall = "❌" if False in marks else "✅" if True in marks else "—"
        table_rows.append([model, overall, "; ".join(f"{row[1]}: {row[4]}" for row in in_domain) or "—", general])
    lead = ("**General ability** (IFEval prompt-level strict accuracy, 95% Wilson interval): a model below the "
            "reference's interval lost instruction following, whatever it gained on your data.")
    if start is None:
        lead += (" No reference: reports/eval/init.json is missing (run `dvc repro evaluate`)." if reference is None
                 else f" No reference: {reference} has no IFEval figure.")
    return lead + "\n\n" + table(["model", "overall", "in domain (your data)", "general ability"], table_rows)


def card_noise(reports: Path, params_file: Path) -> tuple[dict | None, str]:
    """(the noise measurement whose bands the card shows, the line that says so): None when there is none or it
    was measured at other params than `params_file` holds (seeds aside), whose spread says nothing of this run."""
    measured = noise_file.load(reports / "noise.json")
    if not measured:
        return None, ("Noise: not measured (`chatforge noise --seeds 5` writes reports/noise.json); a difference "
                      "between two runs means little until it is.")
    try:
        stale = noise_file.stale_sections(measured, load_params(params_file))
    except ChatforgeError as error:
        return None, f"Noise bands withheld: the params to compare reports/noise.json with are unreadable ({error})."
    if stale:
        return None, (f"Noise bands withheld: reports/noise.json was measured at other params (differing sections: "
                      f"{', '.join(sorted(stale))}; its params hash `{measured['params_hash']}`). Measure the noise "
                      "at these params with `chatforge noise --seeds 5`.")
    return measured, (f"Noise: ±2σ over {len(measured['seeds'])} runs with every seed moved (reports/noise.json, "
                      f"params hash `{measured['params_hash']}`, these params); a change inside the band is "
                      "indistinguishable from a new seed.")


def section_summary(reports: Path, pairs_file: Path | None, params_file: Path) -> str:
    pretrain, sft = load(reports, "pretrain.json"), load(reports, "sft.json")
    measured, noise_line = card_noise(reports, params_file)
    rows = headline_rows(reports, pairs_file, measured)
    header = ["stage", "headline", "result", "baseline", "verdict"] + (["noise (2σ)"] if measured else [])
    parts = ["## Summary",
             f"**Data**: {funnel_line(load(reports, 'collect.json'), load(reports, 'clean.json'))}.",
             f"**Model**: {model_line(pretrain, sft)}.",
             table(header, rows) if rows else missing("every stage report", "pretrain"),
             noise_line,
             general_ability_summary(reports, rows),
             f"**Wall time**: {total_seconds(reports) / 60:.1f} minutes of stages (per stage: the last table)."]
    return "\n\n".join(parts)


# ---------------------------------------------------------------- replies side by side

def section_replies(reports: Path) -> str:
    samples = {}
    for model in EVALUATED_MODELS:
        path = reports / "eval" / f"{model}_samples.jsonl"
        if path.exists() and (by_id := {sample["id"]: sample for sample in read_jsonl(path)}):
            samples[model] = by_id  # an empty file: the init is base (pretrain.max_steps 0) and answered as base
    title = f"## Replies to {REPLY_PROMPTS} fixed test prompts"
    if not samples:
        return f"{title}\n\n" + missing("reports/eval/*_samples.jsonl", "evaluate")
    first = next(iter(samples.values()))
    shared = [key for key in first if all(key in by_id for by_id in samples.values())][:REPLY_PROMPTS]
    parts = [title, "The first held-out test prompts every model answered (evaluate, with the `generate` params "
                    "and one seed); the reward model's score in brackets."]
    for number, key in enumerate(shared, start=1):
        prompt = first[key]["prompt"]
        earlier = f" _(after {len(prompt) - 1} earlier turns)_" if len(prompt) > 1 else ""
        parts.append(f"**{number}. {cell(prompt[-1]['content'])}**{earlier}\n\n" + table(
            ["model", "reply"], [[model, f"{by_id[key]['reply']} [{by_id[key]['score']:.2f}]"]
                                 for model, by_id in samples.items()]))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- data

def dropped_by_reason(clean: dict) -> dict[str, int]:
    """`step/reason` → records dropped, over every kind, in the order the steps run."""
    totals: dict[str, int] = {}
    for by_reason in (clean.get("dropped") or {}).values():
        for reason, count in by_reason.items():
            totals[reason] = totals.get(reason, 0) + count
    position = {step: index for index, step in enumerate(CLEAN_STEPS)}
    return dict(sorted(totals.items(), key=lambda item: (position.get(item[0].split("/")[0], len(CLEAN_STEPS)),
                                                          -item[1])))


def draw_funnel(clean: dict, image: Path) -> None:
    """A waterfall: the records that came in, each reason's drop in the order the steps run, what was kept."""
    plt = pyplot()
    start = sum((clean.get("input") or {}).values())
    drops = dropped_by_reason(clean)
    labels, lefts, widths, colors = ["in"], [0], [start], ["#4c72b0"]
    remaining = start
    for reason, count in drops.items():
        remaining -= count
        labels.append(readable(reason))
        lefts.append(remaining)
        widths.append(count)
        colors.append("#dd8452")
    labels.append("kept")
    lefts.append(0)
    widths.append(remaining)
    colors.append("#55a868")
    figure, axes = plt.subplots(figsize=(7, 0.32 * len(labels) + 0.8))
    bars = axes.barh(range(len(labels)), widths, left=lefts, color=colors)
    axes.bar_label(bars, labels=[f"{w:,}" for w in widths], fontsize=7, padding=2)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.set_xlim(0, start * 1.12)  # room for the first bar's label
    axes.invert_yaxis()
    axes.set_xlabel("records")
    axes.set_title("clean: records in, dropped by reason, kept", fontsize=10)
    figure.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(image, dpi=90)
    plt.close(figure)


def section_data(reports: Path, figures: Path) -> str:
    parts = ["## Data"]
    collect, clean = load(reports, "collect.json"), load(reports, "clean.json")
    if collect:
        rows = [[name, source.get("type"), source.get("read"), *(get(source, f"written.{kind}") for kind in
                 ("conversations", "documents", "preferences")), get(source, "skipped.total"),
                 ", ".join(f"{readable(reason)} {fmt(n)}" for reason, n in
                           sorted((get(source, "skipped.by_reason") or {}).items(), key=lambda item: -item[1])[:3])]
                for name, source in collect.get("sources", {}).items()]
        parts += ["### Collected", table(["source", "type", "read", "conversations", "documents", "preferences",
                                          "skipped", "most skipped"], rows)]
    else:
        parts.append(missing("reports/collect.json", "collect"))
    if clean:
        image = figures / "clean_funnel.png"
        draw_funnel(clean, image)
        kept = get(clean, "output.conversation") or {}
        parts += ["### Cleaning funnel", f"![cleaning funnel]({image.relative_to(reports).as_posix()})",
                  table(["step: reason", "dropped"], [[readable(r), n] for r, n in dropped_by_reason(clean).items()]),
                  f"Kept: {', '.join(f'{split} {fmt(n)}' for split, n in kept.items())} conversations; "
                  f"{fmt(sum((clean.get('pii_replacements') or {}).values()))} PII replacements."]
    else:
        parts.append(missing("reports/clean.json", "clean"))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- stages

STAGE_ROWS = {
    "tokenizer": [("vocabulary", "vocab_size"), ("trained on texts", "train_texts"), ("trained on bytes", "train_bytes"),
                  ("val bytes per token", "val.bytes_per_token"), ("val round trip exact", "val.roundtrip_exact"),
                  ("adopted from", "adopted_from")],
    "tokenize": [("train tokens", "train.tokens"), ("train texts", "train.texts"), ("val tokens", "val.tokens"),
                 ("token dtype", "dtype")],
    "pretrain": [("parameters", "parameters"), ("started from", "init"), ("tokens seen", "tokens_seen"),
                 ("train tokens", "train_tokens"), ("val bits per byte", "val_bits_per_byte"),
                 ("n-gram val bits per byte", "ngram_val_bits_per_byte"), ("val perplexity", "val_perplexity"),
                 ("final train loss", "final_train_loss"), ("tokens per second", "tokens_per_second"),
                 ("resumed from step", "resumed_from_step")],
    "sft": [("steps", "steps"), ("epochs", "epochs"), ("precision", "precision"),
            ("val assistant bits per byte, before", "val_before.bits_per_byte"),
            ("val assistant bits per byte, after", "val_after.bits_per_byte"),
            ("val perplexity, after", "val_after.perplexity"), ("train loss", "train_loss"),
            ("assistant tokens trained", "assistant_tokens_trained"),
            ("assistant tokens cut (did not fit the context)", "assistant_tokens_cut"), ("windows", "windows")],
    "preferences": [("train pairs", "pairs.train.total"), ("train prompts", "pairs.train.prompts"),
                    ("val pairs", "pairs.val.total"), ("val prompts", "pairs.val.prompts")],
    "reward": [("val pair accuracy", "accuracy"), ("mean margin", "mean_margin"), ("train pairs", "train_pairs"),
               ("val pairs", "val_pairs"), ("steps", "steps"), ("precision", "precision"),
               ("chosen score mean", "chosen_score_mean"), ("rejected score mean", "rejected_score_mean")],
    "ppo": [("algorithm", "algorithm"), ("win rate vs SFT", "win_rate"),
            ("score gain in SFT standard deviations", "improvement_in_sft_std"),
            ("KL to the reference (nats/reply)", "kl_to_reference"), ("KL budget", "kl_budget"),
            ("held-out prompts", "heldout_prompts"), ("ended their turn: PPO", "ppo_end_of_turn_rate"),
            ("ended their turn: SFT", "sft_end_of_turn_rate")],
    "dpo": [("implicit-reward val accuracy", "accuracy"), ("mean margin", "mean_margin"), ("steps", "steps"),
            ("train loss", "train_loss"), ("KL to SFT (nats/reply)", "kl_to_sft"),
            ("reply tokens: DPO", "dpo_reply_tokens"), ("reply tokens: SFT", "sft_reply_tokens"),
            ("ended their turn: DPO", "dpo_end_of_turn_rate"), ("ended their turn: SFT", "sft_end_of_turn_rate")],
}
# per-origin/strategy breakdowns shown as their own table
BREAKDOWNS = {"preferences": ("pairs.train.by_strategy", "train pairs"),
              "reward": ("accuracy_by_strategy", "val accuracy"), "dpo": ("accuracy_by_strategy", "val accuracy")}


def draw_curves(live_dir: Path, image: Path, title: str) -> bool:
    """All of a stage's dvclive metrics in one figure; False when there are none."""
    files = sorted((live_dir / "plots" / "metrics").rglob("*.tsv")) if live_dir.exists() else []
    series = [(path, *read_tsv(path.read_text(encoding="utf-8"))) for path in files]
    series = [s for s in series if s[1]]
    if not series:
        return False
    plt = pyplot()
    columns = min(4, len(series))
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False)
    for axis, (path, steps, values, name) in zip(axes.flat, series):
        axis.plot(steps, values, linewidth=1.2)
        axis.set_title(readable(path.relative_to(live_dir / "plots" / "metrics").with_suffix("").as_posix()),
                       fontsize=8)
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


def section_stage(reports: Path, figures: Path, stage: str, title: str, with_curves: bool) -> str:
    report = load(reports, f"{stage}.json")
    parts = [f"## {title}"]
    if report:
        parts.append(labelled(report, STAGE_ROWS[stage]))
        if stage in BREAKDOWNS:
            path, column = BREAKDOWNS[stage]
            parts.append(table(["origin: strategy", column],
                               [[readable(key), value] for key, value in (get(report, path) or {}).items()]))
    else:
        parts.append(missing(f"reports/{stage}.json", stage))
    if with_curves:
        parts.append(curves(reports, stage, figures))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- evaluation, human evaluation, time, environment

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


def figure_text(figure: dict) -> str:
    return f"{percent(figure['accuracy'])} ({interval(figure)}, n {figure['n']})"


def ifeval_table(reports: Path) -> str:
    """Every IFEval figure per model, with its n and 95% Wilson interval."""
    rows = []
    for model, report in eval_reports(reports).items():
        ifeval = get(report, "ifeval")
        if ifeval is None:
            continue
        if "skipped" in ifeval:
            rows.append([model, f"skipped: {ifeval['skipped']}", *[""] * (len(IFEVAL_FIGURES) - 1)])
        else:
            rows.append([model] + [figure_text(ifeval[key]) if key in ifeval else "n/a" for _, key in IFEVAL_FIGURES])
    if not rows:
        return "_No IFEval figures in reports/eval/*.json (run `dvc repro evaluate`)._"
    return ("### General ability: IFEval\n\nInstruction following on IFEval's prompts (lm-eval's `ifeval` checks): "
            "prompt-level counts prompts whose every instruction was followed, instruction-level each instruction; "
            "loose also accepts a reply with its first or last line or markdown removed.\n\n"
            + table(["model"] + [name for name, _ in IFEVAL_FIGURES], rows))


def section_eval(reports: Path) -> str:
    rows = []
    for model, report in eval_reports(reports).items():
        rows.append([model] + [get(report, path) if get(report, path) is not None else "missing"
                               for _, path in EVAL_COLUMNS])
    if all(row[1] == "missing" for row in rows):
        in_domain = missing("reports/eval/*.json", "evaluate")
    else:
        in_domain = ("Lower is better for perplexity and bits per byte; the n-gram baseline (Kneser-Ney on the same "
                     "training text) is scored on the same test text for scale. Replies to the same held-out prompts "
                     "are scored by the reward model; KL to SFT is summed over each reply.\n\n"
                     + table(["model"] + [name for name, _ in EVAL_COLUMNS], rows))
    return "\n\n".join(["## Evaluation on the test split", in_domain, ifeval_table(reports)])


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
        rows.append([name, model["wins"], model["win_rate"], interval,
                     results["reward_model"]["win_rate"][name] if results["reward_model"]["items"] else None])
    lines.append(table(["model", "human wins", "human win rate", "95% Wilson", "reward-model win rate"], rows))
    return "\n\n".join(lines)


def whole_megabytes(value: float | None) -> int | None:
    return None if value is None else round(value)


def section_times(reports: Path) -> str:
    """Each stage's wall time and peak memory as it measured itself; the GPU column only where a stage used CUDA."""
    stages = [(stage, load(reports, f"{stage}.json") or {}) for stage in PIPELINE]
    stages += [(f"evaluate@{model}", load(reports, f"eval/{model}.json") or {}) for model in EVALUATED_MODELS]
    gpu_path = f"{PROVENANCE}.{PEAK_MEMORY}.cuda_allocated_mb"
    with_gpu = any(get(report, gpu_path) is not None for _, report in stages)
    rows = [[name, wall_time(report), whole_megabytes(peak_rss_mb(report)),
             *([whole_megabytes(get(report, gpu_path))] if with_gpu else [])] for name, report in stages]
    largest = [max((row[column] for row in rows if row[column] is not None), default=None)
               for column in range(2, len(rows[0]))]
    rows.append(["**total** (memory: the largest stage)", total_seconds(reports), *largest])
    header = ["stage", "wall time (s)", "peak RSS (MB)", *(["peak GPU allocated (MB)"] if with_gpu else [])]
    return "## Time and peak memory per stage (as each stage measured itself)\n\n" + table(header, rows)


def section_environment(reports: Path) -> str:
    """Where each stage ran (its report's provenance) and what renders this card."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    machines: dict[tuple, list[str]] = {}
    for name in [*PIPELINE, *(f"eval/{model}" for model in EVALUATED_MODELS)]:
        recorded = (load(reports, f"{name}.json") or {}).get(PROVENANCE)
        if recorded:
            key = (recorded["cpu"], recorded["bf16_path"], recorded["device"], recorded["packages"].get("torch"))
            machines.setdefault(key, []).append(name)
    here = provenance()
    rows = [[*key, ", ".join(stages)] for key, stages in machines.items()]
    return "\n\n".join([
        "## Environment",
        f"git revision `{revision}`{dirty}; this card rendered with Python {here['python']} on {here['cpu']} "
        f"({here['cpu_cores']} cores).",
        table(["CPU", "bf16 path", "device", "torch", "stages"], rows) if rows
        else "_No stage report records where it ran._",
        table(["package", "version"], list(here["packages"].items())),
    ])


def build(reports: Path, preference_pairs: Path | None = None, params_file: Path = Path(PARAMS_FILE)) -> str:
    """The card's markdown; figures are written under reports/figures. `preference_pairs`: the val pairs the
    length baselines are counted on (data/preferences/val.jsonl); `params_file`: the params this run was made
    with, which the noise bands must have been measured at."""
    figures = reports / "figures"
    sections = [
        "# chatforge report card",
        f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `dvc repro report`.",
        section_summary(reports, preference_pairs, params_file),
        section_replies(reports),
        section_data(reports, figures),
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
        section_environment(reports),
    ]
    return "\n\n".join(sections) + "\n"
