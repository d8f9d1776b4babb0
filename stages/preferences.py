"""DVC stage `preferences`: imported (hh, oasst) pairs + human labels + synthetic pairs → data/preferences/{train,val}.jsonl."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from chatforge import preferences
from chatforge.console import log, run_stage, stage_seconds
from chatforge.files import SkipLog, read_jsonl, write_jsonl
from chatforge.params import section
from chatforge.provenance import write_report

CONVERSATIONS = [Path("data/clean/train.jsonl"), Path("data/clean/val.jsonl")]
IMPORTED = Path("data/clean/preferences.jsonl")
LABELS = Path("data/labels")
SFT_MODEL = Path("models/sft")
OUT = Path("data/preferences")
REPORT = Path("reports/preferences.json")


def main() -> None:
    config = section(preferences.PreferencesConfig, "preferences")
    skips, judgements = SkipLog(), Counter()
    origins, report_read = {}, {}

    imported_origins = [origin for origin in preferences.IMPORTED_ORIGINS if getattr(config, origin).enabled]
    if imported_origins:
        imported = list(preferences.read_imported(IMPORTED, skips))
        for origin in imported_origins:
            origins[origin] = [pair for pair in imported if pair["meta"]["origin"] == origin]
        log("preferences", f"read {len(imported)} imported pairs from {IMPORTED}: "
                           + ", ".join(f"{len(origins[origin])} {origin}" for origin in imported_origins))
    if config.labels.enabled:
        origins["labels"] = list(preferences.read_labels(LABELS, skips, judgements))
        log("preferences", f"read {sum(judgements.values())} judgements from {LABELS}/ "
                           f"({dict(judgements)}): {len(origins['labels'])} pairs")
        report_read["label_judgements"] = dict(judgements)
    if config.synthetic.enabled:
        conversations = [record for path in CONVERSATIONS for record in read_jsonl(path)]
        sampler = None
        if config.synthetic.strategies.sft_sample > 0:
            preferences.require_stage_dependency("preferences", str(SFT_MODEL), "synthetic.strategies.sft_sample > 0")
            sampler = preferences.make_sft_sampler(SFT_MODEL, config.synthetic, config.seed)
        origins["synthetic"], report_read["prefixes"] = preferences.synthetic_pairs(
            conversations, config.synthetic, config.seed, sampler)
        log("preferences", f"read {len(conversations)} conversations: {report_read['prefixes']} prompts, "
                           f"{len(origins['synthetic'])} synthetic pairs")

    built = preferences.build(origins, config)
    for name, records in built.splits.items():
        write_jsonl(OUT / f"{name}.jsonl", records)
        log("preferences", f"wrote {len(records)} pairs to {OUT / name}.jsonl "
                           f"{built.report['pairs'][name]['by_origin']}")
    dropped = built.report["dropped"]
    log("preferences", f"dropped duplicates {dropped['duplicates']}, invalid {dropped['invalid']}, "
                       f"unreadable lines {skips.total}")
    write_report(REPORT, {**built.report, "read": {**built.report["read"], **report_read},
                        "skipped_lines": skips.as_dict(), "wall_seconds": stage_seconds()})


main = run_stage(main)

if __name__ == "__main__":
    main()
