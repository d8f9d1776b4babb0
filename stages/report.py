"""report: the report card, reports/report.md, from every stage's reports and curves."""
from pathlib import Path

from chatforge.console import log, run_stage
from chatforge.files import atomic_path
from chatforge.report import build

REPORTS = Path("reports")
PREFERENCE_PAIRS = Path("data/preferences/val.jsonl")  # the reward and DPO headlines' length baselines


@run_stage
def main() -> None:
    markdown = build(REPORTS, PREFERENCE_PAIRS)
    with atomic_path(REPORTS / "report.md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    log("report", f"wrote {REPORTS / 'report.md'} ({markdown.count(chr(10)) + 1} lines) and {REPORTS / 'figures'}/")


if __name__ == "__main__":
    main()
