"""ifeval@<model>: instruction following on IFEval (lm-eval's `ifeval` task and checkers, our greedy decoding)
→ reports/ifeval/<model>.json (prompt and instruction level, strict and loose, with n and 95% intervals) and
<model>_samples.jsonl (each prompt's reply and verdicts). Its own stage, so that only a changed model (or the
`ifeval` params) re-runs it; evaluate@<model> copies the summary into its report.

Usage (dvc.yaml runs one per model): python stages/ifeval.py {init,base,sft,ppo,dpo}
"""
from pathlib import Path

from chatforge.console import log, progress, run_stage, stage_seconds
from chatforge.evaluation import model_argument, wrote_init_as_base
from chatforge.evaluation.ifeval import IFEvalConfig, IFEvalUnavailable, ensure_punkt_tab, evaluate_ifeval, load_prompts
from chatforge.files import write_jsonl
from chatforge.inference.loading import load_model
from chatforge.params import load_params, section
from chatforge.provenance import write_report
from chatforge.runtime import set_threads

OUT_DIR = Path("reports/ifeval")


@run_stage
def main() -> None:
    name = model_argument("ifeval")
    stage = f"ifeval@{name}"
    params = load_params()
    config = section(IFEvalConfig, "ifeval", params)
    report, samples = OUT_DIR / f"{name}.json", OUT_DIR / f"{name}_samples.jsonl"
    if wrote_init_as_base("ifeval", name, params, report, samples):
        return
    try:
        ensure_punkt_tab()
        prompts = load_prompts(config.sources)
    except IFEvalUnavailable as why:
        log(stage, f"[yellow]skipped[/]: {why}")
        write_jsonl(samples, [])
        write_report(report, {"model": name, "ifeval": {"skipped": str(why)}, "wall_seconds": stage_seconds()})
        return
    set_threads(config.threads)
    model, tokenizer = load_model(Path("models") / name, stage_hint="pretrain" if name == "init" else name)
    total = min(config.prompts or len(prompts.docs), len(prompts.docs))
    log(stage, f"read {len(prompts.docs)} IFEval prompts from {prompts.source}; answering {total} of them "
               f"greedily, at most {config.max_new_tokens} new tokens each")

    with progress() as bar:
        task = bar.add_task(stage, total=total, info="")
        summary, rows = evaluate_ifeval(model, tokenizer, prompts, config, lambda done: bar.advance(task, done))
    strict, loose = summary["prompt_level_strict"], summary["prompt_level_loose"]
    log(stage, f"prompt level strict {strict['accuracy']:.3f} (95% {strict['low']:.3f}–{strict['high']:.3f}), loose "
               f"{loose['accuracy']:.3f}; instruction level strict {summary['instruction_level_strict']['accuracy']:.3f}"
               f"; {summary['prompts_truncated']} prompts cut to fit the context")
    write_jsonl(samples, rows)
    write_report(report, {"model": name, "ifeval": {**summary, "seconds": stage_seconds()},
                          "wall_seconds": stage_seconds()})
    log(stage, f"wrote {report} and {samples.name}")


if __name__ == "__main__":
    main()
