import json
import os
import subprocess
import sys
from pathlib import Path

DVC_YAML = """stages:
  train:
    cmd: python train.py
    params: [train]
    outs:
      - metrics.json: {cache: false}
      - reports/live/train: {cache: false}
metrics: [metrics.json]
plots:
  - reports/live/train/plots/metrics: {x: step}
"""


def sh(cwd, *command):
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)


def write_run(repo: Path, lr: float, loss: list[float], accuracy: float) -> None:
    (repo / "params.yaml").write_text(f"train:\n  lr: {lr}\n  epochs: 3\n")
    (repo / "metrics.json").write_text(json.dumps({"accuracy": accuracy}))
    tsv = repo / "reports/live/train/plots/metrics/loss.tsv"
    tsv.parent.mkdir(parents=True, exist_ok=True)
    tsv.write_text("step\tloss\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(loss)))
    steady = repo / "reports/live/train/plots/metrics/lr.tsv"
    steady.write_text("step\tlr\n0\t0.1\n1\t0.1\n")


def test_pr_report_shows_params_metrics_and_changed_plots(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "dvc", "init", "-q")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    write_run(repo, lr=0.001, loss=[3.0, 2.0, 1.5], accuracy=0.7)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "base")
    sh(repo, "git", "checkout", "-qb", "change")
    write_run(repo, lr=0.003, loss=[3.0, 1.8, 1.1], accuracy=0.8)
    sh(repo, "git", "commit", "-qam", "faster lr")

    result = subprocess.run([sys.executable, "-m", "chatforge.cli", "pr-report", "--base", "main"],
                            cwd=repo, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, result.stderr
    report = (repo / "pr-report/report.md").read_text()
    params, metrics, plots = report.split("## Params")[1].split("## Metrics")[0], \
        report.split("## Metrics")[1].split("## Changed plots")[0], report.split("## Changed plots")[1]
    assert "train.lr" in params and "0.003" in params and "epochs" not in params
    assert "accuracy" in metrics and "0.8" in metrics
    assert "loss" in plots and "lr.tsv" not in plots  # only the plot that changed
    image = repo / "pr-report" / plots.split("](")[1].split(")")[0]
    assert image.exists() and image.read_bytes()[:4] == b"\x89PNG"


def test_pr_report_with_unknown_base_is_one_line(tmp_path):
    sh(tmp_path, "git", "init", "-q")
    result = subprocess.run([sys.executable, "-m", "chatforge.cli", "pr-report", "--base", "nope"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "nope" in result.stderr
