"""DVC stage `clean`: data/raw → data/clean (train/val/test), dropped.jsonl and reports/clean.json.

Steps (chatforge.cleaning): structure → normalize → PII → quality → language → exact dedup →
near-duplicate dedup → split by a stable hash of the id. Every step and threshold is in params.yaml `clean`.
"""
from __future__ import annotations

from pathlib import Path

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.pipeline import Item, run_clean
from chatforge.console import log, progress, run_stage, stage_seconds
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog, atomic_path, write_json, write_jsonl
from chatforge.params import section
from chatforge.shards import iter_records

RAW = Path("data/raw")
INPUTS = {"conversation": RAW / "conversations", "document": RAW / "documents",
          "preference": RAW / "preferences"}  # folders of shards (chatforge.shards)
CLEAN = Path("data/clean")
REPORT = Path("reports/clean.json")
SPLITS = ("train", "val", "test")


def read_items(skips: SkipLog) -> list[Item]:
    missing = [str(folder) for folder in INPUTS.values() if not folder.is_dir()]
    if missing:
        raise ChatforgeError(f"{missing[0]}: not found; run the collect stage first (python stages/collect.py)")
    return [Item(kind, where, record) for kind, folder in INPUTS.items() for where, record in iter_records(folder, skips)]


def main() -> None:
    config = section(CleanConfig, "clean")
    skips = SkipLog()
    items = read_items(skips)
    log("clean", f"read {len(items)} records from {RAW} ({skips.total} bad lines skipped), num_proc={config.num_proc}")

    with progress() as bar:
        task = bar.add_task("clean", total=len(items), info="")
        result = run_clean(items, config, on_chunk=lambda n: bar.advance(task, n))

    with atomic_path(CLEAN, is_dir=True) as out:
        for split in SPLITS:
            write_jsonl(out / f"{split}.jsonl", result.splits["conversation"].get(split, []))
            write_jsonl(out / f"documents_{split}.jsonl", result.splits["document"].get(split, []))
        write_jsonl(out / "preferences.jsonl", result.splits["preference"].get("all", []))
        write_jsonl(out / "dropped.jsonl", result.dropped)
    write_json(REPORT, {**result.report, "skipped_lines": skips.as_dict(), "wall_seconds": stage_seconds()})

    output = result.report["output"]
    log("clean", f"dropped {result.report['dropped_total']}, truncated {result.report['truncated']['total']}; "
                 f"wrote {output['conversation']} conversations, {output['document']} documents, "
                 f"{output['preference'].get('all', 0)} preferences to {CLEAN}, report {REPORT}")


main = run_stage(main)

if __name__ == "__main__":
    main()
