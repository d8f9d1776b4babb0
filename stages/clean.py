"""DVC stage `clean`: data/raw (shard folders) → data/clean (train/val/test), dropped.jsonl and reports/clean.json.

Steps (chatforge.cleaning, run on datatrove by chatforge.cleaning.engine): structure → normalize → PII →
quality → language → exact dedup → near-duplicate dedup → split by a stable hash. Every step, threshold and
the executor (local, slurm, ray) are in params.yaml `clean`.
"""
from __future__ import annotations

from pathlib import Path

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.engine import clean_shards
from chatforge.console import log, progress, run_stage, stage_seconds
from chatforge.errors import ChatforgeError
from chatforge.files import atomic_path
from chatforge.params import section
from chatforge.provenance import write_report

RAW = Path("data/raw")
INPUTS = {"conversation": RAW / "conversations", "document": RAW / "documents",
          "preference": RAW / "preferences"}  # folders of shards (chatforge.shards)
CLEAN = Path("data/clean")
REPORT = Path("reports/clean.json")


def main() -> None:
    config = section(CleanConfig, "clean")
    missing = [str(folder) for folder in INPUTS.values() if not folder.is_dir()]
    if missing:
        raise ChatforgeError(f"{missing[0]}: not found; run the collect stage first (python stages/collect.py)")
    log("clean", f"reading {RAW}: {config.tasks} tasks on the {config.executor} executor"
                 + (f", {config.workers} at a time" if config.executor == "local" else ""))

    with progress() as bar, atomic_path(CLEAN, is_dir=True) as out:
        task = bar.add_task("clean", total=None, info="")
        report, skips = clean_shards(INPUTS, config, out, on_phase=lambda name, total: bar.update(
            task, description=f"clean: {name}", total=total, completed=0), on_record=lambda: bar.advance(task))
    write_report(REPORT, {**report, "skipped_lines": skips.as_dict(), "wall_seconds": stage_seconds()})

    output = report["output"]
    log("clean", f"read {sum(report['input'].values())} records ({skips.total} bad lines skipped); "
                 f"dropped {report['dropped_total']}, truncated {report['truncated']['total']}; "
                 f"wrote {sum(output['conversation'].values())} conversations, "
                 f"{sum(output['document'].values())} documents, {output['preference'].get('all', 0)} preferences "
                 f"to {CLEAN}, report {REPORT}")


main = run_stage(main)

if __name__ == "__main__":
    main()
