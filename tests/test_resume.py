"""kill -9 and resume for sft, reward, dpo and ppo (pretrain's is in test_pretrain.py): a real SIGKILL once a checkpoint exists, a rerun that says it
resumed from that step, and a final model equal to an uninterrupted run's (bit for bit on CPU)."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from stage_projects import (
    dpo_project, kill_at_first_checkpoint, ppo_project, reward_project, run_stage, saved_tensors, sft_project,
)

pytestmark = pytest.mark.slow  # each test runs a stage as a process, kills it and runs it again

# Checkpoints that do not fall on an epoch boundary: the resumed epoch must replay its shuffled order.
PROJECTS = {
    "sft": (sft_project, {"max_steps": 24, "checkpoint_every": 13}),
    "reward": (reward_project, {"checkpoint_every": 4}),
    "dpo": (dpo_project, {"checkpoint_every": 5}),  # 6 steps an epoch
    "ppo": (ppo_project, {"checkpoint_every": 2}),
}


@pytest.mark.parametrize("stage", [pytest.param(stage, marks=pytest.mark.slow) if stage == "dpo" else stage
                                   for stage in PROJECTS])
def test_killed_stage_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(stage, tiny_tokenizer, tmp_path):
    make_project, params = PROJECTS[stage]
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    make_project(killed, tiny_tokenizer, **params)
    shutil.copytree(killed, uninterrupted)
    checkpoints = killed / "models" / f"{stage}_checkpoint"

    kill_at_first_checkpoint(stage, killed)
    assert not (killed / "models" / stage).exists()
    (checkpoint,) = checkpoints.glob("step_*")
    step = int(checkpoint.name.removeprefix("step_"))

    output = run_stage(stage, killed)
    assert f"resuming from {checkpoint.relative_to(killed)} at step {step}" in output, output
    report = json.loads((killed / "reports" / f"{stage}.json").read_text())
    assert report["resumed_from_step"] == step > 0
    assert [p.name for p in checkpoints.iterdir()] == ["complete.json"]  # nothing left to resume

    run_stage(stage, uninterrupted)
    assert json.loads((uninterrupted / "reports" / f"{stage}.json").read_text())["resumed_from_step"] == 0
    resumed, reference = saved_tensors(killed / "models" / stage), saved_tensors(uninterrupted / "models" / stage)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    assert logged_steps(killed / "reports/live" / stage) == logged_steps(uninterrupted / "reports/live" / stage)


def logged_steps(live_dir) -> dict[str, list[str]]:
    """The steps of each dvclive curve (values such as tokens/s differ between runs; the steps must not: each once)."""
    curves = {}
    for table in sorted(live_dir.glob("plots/metrics/**/*.tsv")):
        header, *rows = table.read_text().splitlines()
        column = header.split("\t").index("step")
        curves[str(table.relative_to(live_dir))] = [row.split("\t")[column] for row in rows]
    assert curves, f"no curves in {live_dir}"
    return curves


def test_a_checkpoint_from_other_params_is_not_resumed_and_the_log_says_why(tiny_tokenizer, tmp_path):
    sft_project(tmp_path, tiny_tokenizer, max_steps=14, checkpoint_every=3)
    kill_at_first_checkpoint("sft", tmp_path)
    sft_project(tmp_path, tiny_tokenizer, max_steps=14, checkpoint_every=3, learning_rate=0.004)
    output = run_stage("sft", tmp_path)
    assert re.search(r"not resuming \S+step_\d+: it was made with other params or inputs "
                     r"\(sft.learning_rate 0.005 → 0.004\); starting from step 0", output), output
    assert json.loads((tmp_path / "reports/sft.json").read_text())["resumed_from_step"] == 0
