import json
import re

import pytest

from chatforge.noise import section_hashes
from chatforge.provenance import KEY as PROVENANCE
from chatforge.provenance import PEAK_MEMORY, provenance, write_report
from chatforge.report import build

PARAMS = {"sft": {"seed": 0, "learning_rate": 0.0015}, "ppo": {"seed": 0, "kl_budget": 6.0}}


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_report_renders_with_sections_missing(tmp_path):
    write(tmp_path / "pretrain.json", {"val_bits_per_byte": 1.8, "ngram_val_bits_per_byte": 1.9, "ngram_order": 5,
                                       "parameters": 4262144, "tokens_seen": 1515520, "train_tokens": 283051,
                                       "wall_seconds": 120.0})
    live = tmp_path / "live" / "pretrain" / "plots" / "metrics"
    live.mkdir(parents=True)
    (live / "train_loss.tsv").write_text("step\ttrain_loss\n0\t5.0\n1\t4.0\n")
    markdown = build(tmp_path)
    assert "# chatforge report card" in markdown
    assert "| pretrain | val bits/byte | 1.8 | 5-gram 1.9 | ✅ 5.3% better than the n-gram |\n" in markdown
    assert "Noise: not measured" in markdown and "noise (2σ)" not in markdown
    assert "4.26M parameters (scratch), pretrained on 1.52M tokens (5.4 passes over 283K training tokens)" in markdown
    assert "**Wall time**: 2.0 minutes" in markdown
    assert (tmp_path / "figures" / "pretrain.png").read_bytes()[:4] == b"\x89PNG"
    assert "figures/pretrain.png" in markdown
    # everything else is missing and says which stage to run, without failing
    for stage in ("collect", "clean", "tokenizer", "sft", "reward", "ppo", "dpo", "evaluate", "human_eval"):
        assert f"`dvc repro {stage}`" in markdown
    assert "## Environment" in markdown and "transformers" in markdown


def pairs_file(tmp_path):
    """Val pairs where the longer reply is chosen 3 times in 4 (one tie, left out)."""
    def pair(chosen, rejected):
        return {"chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in [pair("long one", "s"), pair("longer", "x"), pair("abc", "xyz"),
                                                         pair("long", "a"), pair("a", "long")]) + "\n")
    return path


def test_summary_replies_funnel_and_readable_tables(tmp_path):
    reports = tmp_path / "reports"
    write(reports / "collect.json", {"sources": {"chatterbot": {"type": "chatterbot", "read": 110, "written": {
        "conversations": 100, "documents": 0, "preferences": 0}, "skipped": {"total": 10, "by_reason": {"not_a_list": 10},
        "examples": ["chatterbot_corpus/data/english/ai.yml:3: not_a_list"]}}},
        "totals": {"read": 110, "written": {"conversations": 100, "documents": 0, "preferences": 0}, "skipped": 10}})
    write(reports / "clean.json", {"input": {"conversation": 100}, "dropped_total": 30,
                                   "dropped": {"conversation": {"exact_dedup/duplicate": 20, "quality/turn_too_long": 10}},
                                   "output": {"conversation": {"train": 60, "val": 5, "test": 5}}})
    write(reports / "sft.json", {"val_before": {"bits_per_byte": 2.8}, "val_after": {"bits_per_byte": 2.0}, "steps": 480,
                                 "params": {"learning_rate": 0.0015, "seed": 0}})
    write_report(reports / "reward.json", {"accuracy": 0.9, "accuracy_by_strategy": {"synthetic/other_reply": 0.7}})
    write(reports / "ppo.json", {"win_rate": 0.71, "kl_to_reference": 2.5, "kl_budget": 6.0})
    write(reports / "noise.json", {"seeds": [0, 1, 2], "params_hash": "abc", "section_hashes": section_hashes(PARAMS),
                                   "metrics": {"reports/ppo.json": {"win_rate": {"mean": 0.7, "std": 0.05}}}})
    write(tmp_path / "params.yaml", PARAMS)  # JSON is YAML: the params the noise was measured at
    for model in ("base", "sft", "ppo"):
        samples = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
                    "reply": f"{model} says {i} | more", "score": 0.5} for i in range(10)]
        (reports / "eval").mkdir(exist_ok=True)
        (reports / "eval" / f"{model}_samples.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    (reports / "eval" / "init_samples.jsonl").write_text("")  # the init is base: it answered as base
    markdown = build(reports, pairs_file(tmp_path), tmp_path / "params.yaml")
    summary = markdown.split("## Summary")[1].split("## Replies")[0]
    assert "110 records read from 1 sources (chatterbot) → 100 conversations collected → 30 dropped in cleaning" in summary
    assert "| sft | assistant bits/byte (val) | 2 | base 2.8 | ✅ 28.6% better than base |" in summary
    assert "| reward | val pair accuracy | 0.9 | longer wins 0.750 / shorter wins 0.250 | ✅ +0.150" in summary
    assert "| ppo | win rate vs SFT (reward model) | 0.71 | 0.5 (a tie) | ✅ 71.0% of held-out prompts | ±0.1 |" in summary
    assert "| ppo | KL to SFT (nats/reply) | 2.5 | budget 6 | ✅ within the budget |" in summary
    assert "±2σ over 3 runs" in summary
    replies = markdown.split("## Replies to 8 fixed test prompts")[1].split("## Data")[0]
    assert replies.count("**") == 16 and "question 7" in replies and "question 8" not in replies
    assert "| base | base says 0 \\| more [0.50] |\n| sft | sft says 0 \\| more [0.50] |\n| ppo |" in replies
    assert (reports / "figures" / "clean_funnel.png").read_bytes()[:4] == b"\x89PNG"
    assert "| exact dedup: duplicate | 20 |" in markdown and "| synthetic: other reply | 0.7 |" in markdown
    # no dotted keys, no params echoed back as metrics, no provenance in the tables
    assert not re.search(r"\| [a-z_]+\.[a-z_]+ \|", markdown)
    assert "learning_rate" not in markdown and "learning rate" not in markdown and "bf16_path" not in markdown


def test_report_shows_eval_table_and_no_invented_human_numbers(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "sft.json").write_text(json.dumps({
        "all_tokens": {"perplexity": 12.0, "bits_per_byte": 1.1}, "ngram": {"bits_per_byte": 1.5},
        "replies": {"reward_mean": 0.3, "kl_to_sft": 0.0}, "wall_seconds": 5.0}))
    (tmp_path / "eval" / "dpo.json").write_text(json.dumps({"replies": {"reward_mean": 0.5, "kl_to_sft": 1.25}}))
    (tmp_path / "human_eval").mkdir()
    (tmp_path / "human_eval" / "results.json").write_text(json.dumps({
        "pair": ["sft", "ppo"], "n": 0, "ties": 0, "annotators": 0,
        "models": {m: {"wins": 0, "win_rate": None, "ci95": None} for m in ("sft", "ppo")},
        "reward_model": {"items": 3, "wins": {"sft": 1, "ppo": 2}, "win_rate": {"sft": 1 / 3, "ppo": 2 / 3}}}))
    markdown = build(tmp_path)
    assert "| sft | 12 | 1.1 | 1.5 |" in markdown
    assert "No ratings yet" in markdown and "| ppo | 0 | n/a | n/a | 0.6667 |" in markdown
    assert "| evaluate@sft | 5 |" in markdown and "| evaluate@dpo | n/a |" in markdown
    dpo_row = next(line for line in markdown.splitlines() if line.startswith("| dpo |"))
    assert dpo_row.endswith("| 0.5 | missing | missing | missing | missing | 1.25 |")


def test_time_table_shows_each_stages_peak_memory_beside_its_wall_time(tmp_path):
    def measured(seconds, rss_mb, **gpu):
        return {"wall_seconds": seconds, PROVENANCE: {**provenance(), PEAK_MEMORY: {"rss_mb": rss_mb, **gpu}}}

    write(tmp_path / "tokenizer.json", measured(60.0, 6012.4))
    write(tmp_path / "tokenize.json", measured(90.0, 15012.6))
    write(tmp_path / "eval" / "sft.json", {"wall_seconds": 5.0})  # written before peak memory was recorded
    times = build(tmp_path).split("## Time and peak memory per stage")[1].split("## Environment")[0]
    assert "| stage | wall time (s) | peak RSS (MB) |\n" in times and "GPU" not in times
    assert "| tokenizer | 60 | 6,012 |" in times and "| tokenize | 90 | 15,013 |" in times
    assert "| collect | n/a | n/a |" in times
    assert "| evaluate@sft | 5 | n/a |" in times and "| **total** (memory: the largest stage) | 155 | 15,013 |" in times

    write(tmp_path / "preferences.json", measured(30.0, 2000.0, cuda_allocated_mb=3456.7))
    times = build(tmp_path).split("## Time and peak memory per stage")[1]
    assert "| peak GPU allocated (MB) |" in times and "| preferences | 30 | 2,000 | 3,457 |" in times
    assert "| tokenizer | 60 | 6,012 | n/a |" in times


def with_noise_measured_at(reports, params):
    write(reports / "ppo.json", {"win_rate": 0.71, "kl_to_reference": 2.5, "kl_budget": 6.0})
    write(reports / "noise.json", {"seeds": [0, 1, 2, 3, 4], "params_hash": "1b7a14f87360e0a5",
                                   "section_hashes": section_hashes(params),
                                   "metrics": {"reports/ppo.json": {"win_rate": {"mean": 0.7, "std": 0.02}}}})


def test_noise_bands_are_shown_only_when_measured_at_these_params(tmp_path):
    reports, params_file = tmp_path / "reports", tmp_path / "params.yaml"
    scratch = {**PARAMS, "model": {"init": "scratch"}}
    write(params_file, {**scratch, "sft": {"seed": 3, "learning_rate": 0.0015}})  # another seed: the same noise
    with_noise_measured_at(reports, scratch)
    summary = build(reports, params_file=params_file).split("## Replies")[0]
    assert "| stage | headline | result | baseline | verdict | noise (2σ) |" in summary
    assert "| ✅ 71.0% of held-out prompts | ±0.04 |" in summary and "±2σ over 5 runs" in summary

    # the smollm2 experiment's card must not show the scratch run's bands
    write(params_file, {**PARAMS, "sft": {"seed": 0, "learning_rate": 0.0002}, "model": {"init": "smollm2-135m"}})
    summary = build(reports, params_file=params_file).split("## Replies")[0]
    assert ("Noise bands withheld: reports/noise.json was measured at other params (differing sections: model, sft;"
            in summary)
    assert "noise (2σ)" not in summary and "±0.04" not in summary
    assert "| ✅ 71.0% of held-out prompts |\n" in summary


def ifeval(prompt_strict: tuple[float, float, float]) -> dict:
    accuracy, low, high = prompt_strict
    figure = {"accuracy": accuracy, "n": 541, "low": low, "high": high}
    return {"prompts": 541, "instructions": 834, "max_new_tokens": 256, "seconds": 12.0,
            "prompt_level_strict": figure, "prompt_level_loose": figure,
            "instruction_level_strict": {"accuracy": 0.281, "n": 834, "low": 0.251, "high": 0.313},
            "instruction_level_loose": {"accuracy": 0.303, "n": 834, "low": 0.272, "high": 0.335}}


def trained_models(reports, init: dict, **accuracies):
    """Made-up eval reports: the init's `init`, every other model's IFEval prompt-level strict from `accuracies`;
    SFT better than base on its own data (an in-domain ✅)."""
    write(reports / "eval" / "init.json", init)
    for model, figure in accuracies.items():
        write(reports / "eval" / f"{model}.json", {"model": model, "ifeval": ifeval(figure)})
    write(reports / "sft.json", {"val_before": {"bits_per_byte": 2.5}, "val_after": {"bits_per_byte": 2.06}})


def general_rows(markdown: str) -> dict[str, str]:
    summary = markdown.split("**General ability**")[1].split("**Wall time**")[0]
    return {line.split(" | ")[0].removeprefix("| "): line for line in summary.splitlines() if line.startswith("| ")}


def test_a_drop_beyond_the_starts_interval_is_a_loss_an_in_domain_win_does_not_hide(tmp_path):
    reports = tmp_path / "reports"
    trained_models(reports, {"model": "init", "ifeval": ifeval((0.172, 0.142, 0.205))},
                   base=(0.168, 0.138, 0.201), sft=(0.109, 0.085, 0.138), ppo=(0.150, 0.122, 0.182))
    markdown = build(reports)
    rows = general_rows(markdown)
    assert rows["init"] == "| init | — | — | IFEval 17.2% (14.2–20.5%): the reference, the pretrained start |"
    assert rows["sft"] == ("| sft | ❌ | assistant bits/byte (val): ✅ 17.6% better than base | "
                           "❌ IFEval 17.2% → 10.9% (init 95% interval 14.2–20.5%): instruction following lost |")
    assert rows["ppo"] == "| ppo | ✅ | — | ✅ IFEval 17.2% → 15.0% (init 95% interval 14.2–20.5%): within the interval |"
    assert rows["base"].startswith("| base | ✅ | — | ✅ IFEval 17.2% → 16.8%")
    evaluation = markdown.split("### General ability: IFEval")[1]
    assert ("| init | 17.2% (14.2–20.5%, n 541) | 28.1% (25.1–31.3%, n 834) | 17.2% (14.2–20.5%, n 541) |"
            in evaluation)
    assert "| sft | 10.9% (8.5–13.8%, n 541) |" in evaluation


@pytest.mark.parametrize("init, why", [
    ({"model": "init", "same_as": "base", "note": "pretrain.max_steps is 0"}, "the init itself"),
    ({"model": "init", "same_as": None, "scratch": True, "note": "no pretrained start"}, "no pretrained start"),
    ({"model": "init", "scratch": True, "ifeval": ifeval((0.0, 0.0, 0.007))}, "no pretrained start"),  # random weights
])
def test_base_is_the_reference_when_it_is_the_init_or_there_is_none(tmp_path, init, why):
    reports = tmp_path / "reports"
    trained_models(reports, init, base=(0.172, 0.142, 0.205), sft=(0.160, 0.131, 0.193), dpo=(0.12, 0.095, 0.15))
    rows = general_rows(build(reports))
    assert "init" not in rows and f"the reference, {why}" in rows["base"]
    assert "✅ IFEval 17.2% → 16.0% (base 95% interval 14.2–20.5%): within the interval" in rows["sft"]
    assert rows["dpo"].startswith("| dpo | ❌ |") and "instruction following lost" in rows["dpo"]


def test_skipped_ifeval_is_said_in_one_line(tmp_path):
    reports = tmp_path / "reports"
    for model in ("init", "base", "sft"):
        write(reports / "eval" / f"{model}.json", {"model": model, "ifeval": {"skipped": "no IFEval data found"}})
    markdown = build(reports)
    assert "**General ability**: IFEval skipped (no IFEval data found).\n" in markdown
    assert "| sft | skipped: no IFEval data found |" in markdown.split("### General ability: IFEval")[1]
