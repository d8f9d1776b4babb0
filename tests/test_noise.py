import json
import os
import subprocess
import sys

import pytest

import numpy

from chatforge.noise import (aggregate, binomial_sigma, rate_counts, section_hashes, seed_keys, seed_sigma_widening,
                             stale_sections, with_overrides, with_seed_offset)
from chatforge.metrics import read_metrics
from chatforge.pr_report import DEFAULT_SIGMAS
from chatforge.provenance import KEY as PROVENANCE
from chatforge.provenance import PEAK_MEMORY, write_report

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


def test_peak_memory_stays_out_of_the_noise(tmp_path):
    for run, accuracy in enumerate((0.5, 0.7)):
        write_report(tmp_path / str(run) / "r.json", {"acc": accuracy, "wall_seconds": 3.0})
    runs = [read_metrics(tmp_path / str(run), ["r.json"]) for run in range(2)]
    assert PEAK_MEMORY in json.loads((tmp_path / "0" / "r.json").read_text())[PROVENANCE]
    assert list(aggregate(runs)["r.json"]) == ["acc"]


def test_stale_sections_are_those_matching_none_of_the_params():
    measured = {"section_hashes": section_hashes(PARAMS)}
    reseeded, relearned = with_seed_offset(PARAMS, 4), with_overrides(PARAMS, ["sft.lr=1e-3"])
    assert stale_sections(measured, reseeded) == set()
    assert stale_sections(measured, relearned) == {"sft"}
    assert stale_sections(measured, relearned, reseeded) == set()  # base's params are the null: the noise holds
    assert stale_sections(measured, with_overrides(PARAMS, ["ifeval.prompts=10"])) == {"ifeval"}  # a new section


def test_widened_seed_sigma_keeps_the_false_alarm_rate_of_a_known_sigma():
    """Five seed runs give s; base and head are two more runs of the same noise. Judged at 2√2·s·widening, a
    seed-only change is flagged as often as at 2√2·σ with σ known (4.55%, two-sided 2σ of the difference)."""
    widening = seed_sigma_widening(5, DEFAULT_SIGMAS)
    assert widening == pytest.approx(1.4347, abs=1e-4)  # t(4)'s 97.7% quantile over the normal's 2
    assert seed_sigma_widening(2, DEFAULT_SIGMAS) > 5 and seed_sigma_widening(1000, DEFAULT_SIGMAS) < 1.002
    draws = numpy.random.default_rng(0).standard_normal((200_000, 7))
    spread = draws[:, :5].std(axis=1, ddof=1)
    flagged = numpy.abs(draws[:, 6] - draws[:, 5]) > DEFAULT_SIGMAS * spread * widening
    assert flagged.mean() == pytest.approx(0.0455, abs=0.002)
    unwidened = numpy.abs(draws[:, 6] - draws[:, 5]) > DEFAULT_SIGMAS * spread
    assert unwidened.mean() > 0.1  # the plain 2√2·s rule: 11.6% at 5 runs


def test_binomial_sigma():
    assert binomial_sigma(0.5, 100) == pytest.approx(0.05) and binomial_sigma(1.0, 64) == 0.0


def test_rates_are_found_by_convention_and_by_the_table_of_older_reports():
    ifeval = {"ifeval": {"prompts": 541, "prompt_level_strict": {"accuracy": 0.172, "n": 541, "low": 0.142,
                                                                 "high": 0.205}}}
    assert rate_counts("reports/eval/init.json", ifeval) == {f"ifeval.prompt_level_strict.{key}": 541
                                                             for key in ("accuracy", "low", "high")}
    ppo = {"win_rate": 0.71, "heldout_prompts": 64, "ppo_end_of_turn_rate": 1.0, "kl_to_reference": 3.5}
    assert rate_counts("reports/ppo.json", ppo) == {"win_rate": 64, "ppo_end_of_turn_rate": 64}
    reward = {"accuracy": 0.89, "val_pairs": 1240, "accuracy_by_strategy": {"synthetic/repetition": 0.98},
              "pairs_by_strategy": {"synthetic/repetition": 391}, "accuracy_by_origin": {"synthetic": 0.89}}
    assert rate_counts("reports/reward.json", reward) == {"accuracy": 1240,
                                                          "accuracy_by_strategy.synthetic/repetition": 391}
    # integers beside an `n` are counts, not rates; a rate over no items has no sampling error to speak of
    human = {"n": 12, "ties": 1, "annotators": 1, "models": {"sft": {"wins": 4, "win_rate": 4 / 11}},
             "reward_model": {"items": 0, "win_rate": {"sft": 0.0}}}
    assert rate_counts("reports/human_eval/results.json", human) == {"models.sft.win_rate": 12}


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
