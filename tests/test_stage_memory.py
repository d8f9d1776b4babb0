"""benchmarks/stage_memory.py without running the pipeline: its arguments, its dry run, and its table read from a
project that already ran (fabricated reports and weights)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatforge.provenance import KEY as PROVENANCE
from chatforge.provenance import PEAK_MEMORY

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("stage_memory", REPO / "benchmarks" / "stage_memory.py")
stage_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_memory)

DVC_YAML = """stages:
  train:
    cmd: python train.py
    outs:
      - models/base
      - reports/train.json: {cache: false}
  score:
    matrix:
      model: [a, b]
    cmd: python score.py ${item.model}
    outs:
      - reports/score/${item.model}.json: {cache: false}
      - reports/score/${item.model}_samples.jsonl: {cache: false}
"""


def test_a_workspace_run_takes_no_params_stages_or_work_dir(capsys):
    for conflicting in (["--profile", "smollm2-135m"], ["-S", "sft.max_steps=1"], ["--until", "sft"]):
        with pytest.raises(SystemExit):
            stage_memory.parse_args(["--workspace", ".", *conflicting])
    args = stage_memory.parse_args(["--profile", "smollm2-135m", "-S", "dpo.eval_batch_size=8", "-S", "sft.seed=3",
                                    "--until", "dpo", "--until", "ppo"])
    assert args.overrides == ["dpo.eval_batch_size=8", "sft.seed=3"] and args.until == ["dpo", "ppo"]


def test_dry_run_prints_the_knobs_and_stages_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # profiles/ are found from the project root, as the benchmark is run
    monkeypatch.setattr(stage_memory, "run_in_copy", lambda *args: pytest.fail("a dry run ran the pipeline"))
    stage_memory.main(["--profile", "smollm2-135m", "-S", "dpo.eval_batch_size=8", "--dry-run"])
    printed = capsys.readouterr().out
    stages = printed.splitlines()[0]
    assert stages.startswith("would run collect, clean, tokenizer") and "evaluate@dpo" in stages
    assert '  model.init: "smollm2-135m"\n' in printed and "  dpo.eval_batch_size: 8\n" in printed
    stage_memory.main(["--until", "dpo", "--dry-run"])
    assert "would run dpo and the stages upstream" in capsys.readouterr().out


def test_the_table_reads_each_stages_peak_beside_the_parameter_bytes(tmp_path, capsys):
    from safetensors.torch import save_file

    subprocess.run([Path(sys.executable).parent / "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "models/base").mkdir(parents=True)
    save_file({"weight": torch.zeros(200_000), "bias": torch.zeros(50_000)}, tmp_path / "models/base/model.safetensors")
    (tmp_path / "reports/score").mkdir(parents=True)
    peak = {"rss_mb": 1500.4, "children_rss_mb": 0.0}
    (tmp_path / "reports/train.json").write_text(json.dumps({PROVENANCE: {PEAK_MEMORY: peak}}))
    (tmp_path / "reports/score/a.json").write_text(json.dumps({"accuracy": 0.5}))  # before peaks were recorded
    stage_memory.main(["--workspace", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "parameter bytes (models/base): 1.0 MB"
    assert lines[2].split() == ["train", "1500", "1500.40", "0", "-"]
    assert lines[3].split() == ["score@a", "not", "recorded"] and lines[4].split() == ["score@b", "no", "report"]
