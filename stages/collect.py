"""DVC stage `collect`: read the sources listed in params.yaml `collect.sources` into data/raw/.

Writes data/raw/{conversations,documents,preferences}/part-*.jsonl.gz shards (every kind has at least
one, possibly empty), data/raw/manifest.json (records and shards per kind; chatforge.shards) and
reports/collect.json (per source: records read/written by kind, skipped by reason with examples).
"""
from chatforge.collect import CollectConfig, build_sources, collect
from chatforge.console import run_stage, stage_seconds
from chatforge.params import section
from chatforge.provenance import write_report

OUT_DIR = "data/raw"
REPORT = "reports/collect.json"


@run_stage
def main() -> None:
    config = section(CollectConfig, "collect")
    sources = build_sources(config)  # every source's options and paths checked before any runs
    report = collect(sources, OUT_DIR, config.records_per_shard)
    write_report(REPORT, {**report, "wall_seconds": stage_seconds()})


if __name__ == "__main__":
    main()
