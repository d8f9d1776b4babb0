import json
import os
import subprocess
import sys

import pytest

from chatforge.noise import aggregate, section_hashes, seed_keys, with_overrides, with_seed_offset

PARAMS = {"clean": {"near_dedup": {"seed": 1, "threshold": 0.5}}, "sft": {"seed": 0, "lr": 0.1},
          "collect": {"sources": [{"type": "x", "seed": 7}]}, "model": {"depth": 2}}


def test_every_seed_is_found_and_moved_together():
    assert seed_keys(PARAMS) == {"clean.near_dedup.seed": 1, "sft.seed": 0, "collect.sources.0.seed": 7}
    moved = with_seed_offset(PARAMS, 3)
    assert seed_keys(moved) == {"clean.near_dedup.seed": 4, "sft.seed": 3, "collect.sources.0.seed": 10}
    assert moved["sft"]["lr"] == 0.1 and PARAMS["sft"]["seed"] == 0  # the input is left as it was


def test_section_hashes_ignore_seeds_but_see_every_other_knob():
    hashes = section_hashes(PARAMS)
    assert section_hashes(with_seed_offset(PARAMS, 5)) == hashes
    changed = section_hashes(with_overrides(PARAMS, ["sft.lr=1e-3"]))
    assert changed["sft"] != hashes["sft"] and {k: v for k, v in changed.items() if k != "sft"} == \
        {k: v for k, v in hashes.items() if k != "sft"}


def test_overrides_take_yaml_values():
    changed = with_overrides(PARAMS, ["sft.lr=1e-3", "sft.lora={r: 4}", "model.init=null", "new.key=[1, 2]"])
    assert changed["sft"]["lr"] == 0.001 and changed["sft"]["lora"] == {"r": 4}
    assert changed["model"]["init"] is None and changed["new"]["key"] == [1, 2]


def test_aggregate_gives_spread_of_shared_metrics_without_times():
    runs = [{"r.json": {"acc": 0.5, "wall_seconds": 3.0, "only_here": 1.0}}, {"r.json": {"acc": 0.7, "wall_seconds": 9.0}},
            {"r.json": {"acc": 0.6, "wall_seconds": 4.0}, "other.json": {"x": 1.0}}]
    noise = aggregate(runs)
    assert list(noise) == ["r.json"] and list(noise["r.json"]) == ["acc"]
    acc = noise["r.json"]["acc"]
    assert acc["mean"] == pytest.approx(0.6) and acc["std"] == pytest.approx(0.1)
    assert (acc["min"], acc["max"]) == (0.5, 0.7)


TRAIN = """import random, yaml
from chatforge.provenance import write_report
params = yaml.safe_load(open("params.yaml"))["train"]
random.seed(params["seed"])
write_report("metrics.json", {"accuracy": params["base"] + random.random() / 10, "steps": 10, "wall_seconds": 1.0})
"""
DVC_YAML = """stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [train]
    outs:
      - metrics.json: {cache: false}
metrics: [metrics.json]
"""


def noise_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    (repo / "train.py").write_text(TRAIN)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("train:\n  seed: 0\n  base: 0.5\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return repo, env


def test_noise_runs_the_pipeline_per_seed_in_a_copy(tmp_path):
    repo, env = noise_repo(tmp_path)
    result = subprocess.run([sys.executable, "-m", "chatforge.cli", "noise", "--seeds", "3", "-S", "train.base=0.25"],
                            cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    noise = json.loads((repo / "reports/noise.json").read_text())
    accuracy = noise["metrics"]["metrics.json"]["accuracy"]
    assert noise["seeds"] == [0, 1, 2] and noise["seed_keys"] == {"train.seed": 0}
    assert len(set(accuracy["values"])) == 3 and 0.25 <= accuracy["min"] < accuracy["max"] <= 0.35  # the override
    assert noise["metrics"]["metrics.json"]["steps"]["std"] == 0.0
    assert "wall_seconds" not in noise["metrics"]["metrics.json"] and "provenance.cpu" not in noise["metrics"]["metrics.json"]
    assert noise["section_hashes"]["train"] == section_hashes({"train": {"seed": 0, "base": 0.25}})["train"]
    assert not (repo / "metrics.json").exists() and not (repo / "dvc.lock").exists()  # the workspace is untouched


def test_noise_takes_run_zero_from_an_up_to_date_workspace(tmp_path):
    repo, env = noise_repo(tmp_path)
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, check=True, capture_output=True, env=env)
    own = json.loads((repo / "metrics.json").read_text())["accuracy"]
    result = subprocess.run([sys.executable, "-m", "chatforge.cli", "noise", "--seeds", "2"],
                            cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    noise = json.loads((repo / "reports/noise.json").read_text())
    assert noise["runs"][0] == {"offset": 0, "seconds": 1.0, "workspace": True} and "workspace" not in noise["runs"][1]
    assert noise["metrics"]["metrics.json"]["accuracy"]["values"][0] == own

    (repo / "params.yaml").write_text("train:\n  seed: 0\n  base: 0.6\n")  # the workspace's run is out of date
    result = subprocess.run([sys.executable, "-m", "chatforge.cli", "noise", "--seeds", "2"],
                            cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert not any("workspace" in run for run in json.loads((repo / "reports/noise.json").read_text())["runs"])
