"""The whole pipeline end to end on tiny params: `dvc repro` in a copy of the project, once from scratch and
once from a tiny pretrained model (`model.init`: a saved folder in SmolLM2's shape, ChatML template).

Also checks the DVC wiring a user relies on: a no-op repro after a full one, that turning a ppo knob
re-runs exactly ppo and the stages after it, that human_eval compares any two models by its params, and that a
pretrain knob never re-runs tokenization.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # `dvc repro` of every stage, twice over

ROOT = Path(__file__).resolve().parents[1]
SHARED_IFEVAL = ROOT.parent / "shared" / "benchmarks" / "ifeval" / "input_data.jsonl"  # absent: a skipped report

TINY = {
    "collect": {"sources": [{"type": "chatterbot", "name": "chatterbot", "languages": ["english", "spanish"]}]},
    "clean": {"tasks": 1, "workers": 1},
    "tokenizer": {"vocab_size": 320},
    "model": {"depth": 1, "aspect_ratio": 32, "head_dim": 16, "context_length": 64},
    "pretrain": {"batch_size": 4, "max_steps": 6, "warmup_steps": 1, "eval_steps": 3, "checkpoint_every": 3,
                 "ngram_order": 2},
    "sft": {"max_steps": 4, "batch_size": 8, "eval_steps": 2, "logging_steps": 1, "eval_batch_size": 16},
    "reward": {"epochs": 1, "batch_size": 32, "eval_steps": 20, "logging_steps": 5, "max_length": 64},
    "ppo": {"steps": 2, "batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 8,
            "max_prompt_tokens": 32, "heldout_prompts": 4, "eval_batch_size": 4},
    "dpo": {"max_steps": 3, "batch_size": 8, "logging_steps": 1, "eval_steps": 2, "max_val_pairs": 16,
            "max_prompt_tokens": 32, "heldout_prompts": 4, "max_new_tokens": 8, "eval_batch_size": 8},
    "evaluate": {"num_prompts": 4, "batch_size": 4, "ngram_order": 2, "max_new_tokens": 8},
    "ifeval": {"sources": [str(SHARED_IFEVAL)], "prompts": 3, "max_new_tokens": 8, "batch_size": 4},
    "human_eval": {"num_items": 4},
    "generate": {"max_new_tokens": 8},
}


def merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        base[key] = merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return base


def run(command: list[str], cwd: Path, timeout: int = 900) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def wiring_on_scratch_only(init: str) -> None:
    """What re-runs after a change is dvc.yaml's graph, the same for both inits: checked once, on scratch (each
    check re-runs stages as processes, ~70 s of CI per init)."""
    if init != "scratch":
        pytest.skip("dvc.yaml's rerun wiring does not depend on model.init; checked on the scratch project")


@pytest.fixture(scope="module", params=["scratch", "pretrained"])
def project(request, tmp_path_factory):
    """A fresh git + DVC project holding the repository's files and tiny params, fully reproduced."""
    if shutil.which("dvc") is None and not (Path(sys.executable).parent / "dvc").exists():
        pytest.skip("dvc is not installed")
    path = tmp_path_factory.mktemp("pipeline")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name == "dvc.lock" or name.startswith(("reports/", "tests/", "benchmarks/")) or not (ROOT / name).is_file():
            continue
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, path / name)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    if request.param == "pretrained":  # SmolLM2's shape: ChatML with a system prompt, so longer prompts; LoRA
        lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
        merge(params, {"model": {"init": str(request.getfixturevalue("pretrained_dir")), "context_length": 128},
                       "pretrain": {"max_steps": 2}, "sft": {"lora": lora}, "reward": {"lora": lora},
                       "ppo": {"lora": lora, "max_prompt_tokens": 96}, "dpo": {"lora": lora, "max_prompt_tokens": 96}})
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], path)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], path)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"], path)
    output = run([str(Path(sys.executable).parent / "dvc"), "repro"], path)
    return path, output, request.param


def test_dvc_repro_builds_every_stage(project):
    path, output, init = project
    expected = {"collect", "clean", "tokenizer", "tokenize", "pretrain", "sft", "preferences", "reward", "ppo", "dpo",
                "human_eval", "report"} | {f"{stage}@{model}" for stage in ("ifeval", "evaluate")
                                           for model in ("init", "base", "sft", "ppo", "dpo")}
    assert stages_run(output) == expected
    for model in ("init", "base", "sft", "reward", "ppo", "dpo"):
        assert (path / "models" / model / "config.json").exists()
        assert list((path / "models" / model).glob("*.safetensors"))
    for name in ("collect", "clean", "tokenizer", "tokenize", "pretrain", "sft", "preferences", "reward", "ppo", "dpo",
                 "eval/init", "eval/base", "eval/sft", "eval/ppo", "eval/dpo", "human_eval/results"):
        report = json.loads((path / "reports" / f"{name}.json").read_text())
        assert report, name
    results = json.loads((path / "reports/human_eval/results.json").read_text())
    assert results["n"] == 0 and results["models"]["ppo"]["win_rate"] is None
    report_card = (path / "reports/report.md").read_text()
    assert "Not available" not in report_card  # every section found its input
    assert (path / "reports/figures/pretrain.png").exists() and (path / "reports/figures/dpo.png").exists()
    dpo = json.loads((path / "reports/dpo.json").read_text())
    assert 0 <= dpo["accuracy"] <= 1 and dpo["steps"] == 3 and dpo["heldout_prompts"] == 4
    assert math.isfinite(dpo["kl_to_sft"])  # a sample mean of log-ratios (k1), as ppo's: may dip below 0
    evaluations = {m: json.loads((path / f"reports/eval/{m}.json").read_text())["replies"] for m in ("sft", "dpo")}
    assert evaluations["sft"]["kl_to_sft"] == 0.0 and evaluations["dpo"]["kl_to_sft"] > -1e-6  # exact: never below 0
    tokenizer_report = json.loads((path / "reports/tokenizer.json").read_text())
    assert ("adopted_from" in tokenizer_report) == (init == "pretrained")
    # general ability on every model, the start included (pretrain.max_steps > 0: the init is its own row)
    for model in ("init", "base", "sft", "ppo", "dpo"):
        ifeval = json.loads((path / f"reports/eval/{model}.json").read_text())["ifeval"]
        if SHARED_IFEVAL.exists():
            assert ifeval["prompts"] == 3 and ifeval["prompt_level_strict"]["n"] == 3, model
        else:
            assert "no IFEval prompts" in ifeval["skipped"], model


def test_models_load_in_plain_transformers_and_chat(project):
    path, _, _ = project
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for model in ("base", "sft", "ppo", "dpo"):
        AutoModelForCausalLM.from_pretrained(path / "models" / model)
    AutoModelForSequenceClassification.from_pretrained(path / "models/reward")
    tokenizer = AutoTokenizer.from_pretrained(path / "models/ppo")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    reply = run([str(Path(sys.executable).parent / "chatforge"), "chat", "-p", "Hello", "--temperature", "0"], path)
    assert "models/ppo" in reply


def test_noop_repro_and_a_ppo_knob_reruns_only_ppo_and_after(project):
    path, _, init = project
    wiring_on_scratch_only(init)
    dvc = str(Path(sys.executable).parent / "dvc")
    assert stages_run(run([dvc, "repro"], path)) == set()
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["ppo"]["learning_rate"] = params["ppo"]["learning_rate"] * 2
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = stages_run(run([dvc, "repro"], path))
    # human_eval and report re-run only when evaluate@ppo's outputs actually changed (DVC compares hashes)
    assert {"ppo", "evaluate@ppo"} <= rerun <= {"ppo", "ifeval@ppo", "evaluate@ppo", "human_eval", "report"}


def test_human_eval_compares_any_two_models_by_params(project):
    path, _, init = project
    wiring_on_scratch_only(init)
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["human_eval"]["model_b"] = "dpo"
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = stages_run(run([str(Path(sys.executable).parent / "dvc"), "repro"], path))
    assert "human_eval" in rerun and not rerun & {"dpo", "evaluate@dpo", "ppo"}
    results = json.loads((path / "reports/human_eval/results.json").read_text())
    assert results["pair"] == ["sft", "dpo"]


def test_a_pretrain_knob_reruns_pretrain_but_never_tokenization(project):
    path, _, init = project
    wiring_on_scratch_only(init)
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["pretrain"]["eval_steps"] += 1  # a training knob: the token shards stay as they are
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = stages_run(run([str(Path(sys.executable).parent / "dvc"), "repro"], path))
    assert "pretrain" in rerun and not rerun & {"collect", "clean", "tokenizer", "tokenize"}
