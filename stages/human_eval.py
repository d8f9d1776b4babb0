"""human_eval: a blinded A/B sheet of two models' replies, and the summary of people's ratings.

Reads the evaluate stage's samples of both models and data/human_ratings.jsonl (written by
`chatforge rate` and the web page); writes reports/human_eval/{sheet.html,items.jsonl,results.json}.
"""
from pathlib import Path

from chatforge.console import log, run_stage
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog, atomic_path, read_jsonl, write_jsonl
from chatforge.human_eval import HumanEvalConfig, build_items, load_ratings, render_sheet, summarize
from chatforge.params import section
from chatforge.provenance import write_report

SAMPLES = "reports/eval/{model}_samples.jsonl"
RATINGS = Path("data/human_ratings.jsonl")
OUT = Path("reports/human_eval")


@run_stage
def main() -> None:
    config = section(HumanEvalConfig, "human_eval")
    samples = {}
    for model in (config.model_a, config.model_b):
        path = Path(SAMPLES.format(model=model))
        if not path.exists():
            raise ChatforgeError(f"{path}: not found; run `dvc repro evaluate@{model}` first")
        samples[model] = read_jsonl(path)
    items = build_items(samples, config.model_a, config.model_b, config.num_items, config.seed)
    log("human_eval", f"{len(items)} blinded items comparing {config.model_a} and {config.model_b}")

    skips = SkipLog()
    ratings = load_ratings(RATINGS, skips)
    results = summarize(ratings, config.model_a, config.model_b, items)
    results["skipped_ratings"] = skips.as_dict()
    log("human_eval", f"read {len(ratings)} ratings ({skips.total} skipped); {results['n']} on this pair "
                      f"from {results['annotators']} annotators")

    OUT.mkdir(parents=True, exist_ok=True)
    with atomic_path(OUT / "sheet.html") as tmp:
        tmp.write_text(render_sheet(items, "chatforge: which reply is better?"), encoding="utf-8")
    write_jsonl(OUT / "items.jsonl", items)
    write_report(OUT / "results.json", results)
    log("human_eval", f"wrote {OUT}/sheet.html, items.jsonl, results.json")


if __name__ == "__main__":
    main()
