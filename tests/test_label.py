"""`chatforge label` driven by a script: valid records in both modes, resumable, read back as pairs."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from chatforge.conversation import alternate, check_preference, conversation
from chatforge.files import SkipLog, read_jsonl
from chatforge.labeling import parse_ranking
from chatforge.preferences import read_labels

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Hello! How are you today?", "What is your favorite food?", "Can you tell me a joke?",
             "Is the weather nice?", "Do you like Python?"]


@pytest.fixture
def workdir(tmp_path):
    """A project folder with a few val conversations and a params.yaml that keeps replies short."""
    conversations = [conversation(f"val:{i}", "test", alternate([q, "I am fine, thank you."]))
                     for i, q in enumerate(QUESTIONS)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    (tmp_path / "params.yaml").write_text("generate:\n  temperature: 1.0\n  max_new_tokens: 8\n"
                                          "preferences:\n  label_k: 3\n")
    return tmp_path


def label(workdir, model_dir, answers: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "chatforge.cli", "label", "--annotator", "tester", "--conversations",
               "val.jsonl", "--models", str(model_dir), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # tiny model: threads only sync
    return subprocess.run(command, cwd=workdir, input=answers, capture_output=True, text=True, env=env, timeout=120)


def test_pairwise_by_script_then_resume(workdir, tiny_model_dir, monkeypatch, capsys):
    first = label(workdir, tiny_model_dir, "x\na\nb\nt\n", "--limit", "3")
    assert first.returncode == 0, first.stderr
    assert "not a valid answer" in first.stderr
    labels = workdir / "data/labels/tester.jsonl"
    records = read_jsonl(labels)
    assert [r["meta"]["judgement"] for r in records] == ["prefer", "prefer", "tie"]
    for record in records[:2]:
        check_preference(record)
        meta = record["meta"]
        assert meta["annotator"] == "tester" and meta["mode"] == "pairwise" and meta["time"]
        assert meta["models"] == {"chosen": str(tiny_model_dir), "rejected": str(tiny_model_dir)}
        assert record["prompt"][0]["content"] in QUESTIONS
    assert records[0]["id"].endswith("A>B") and records[1]["id"].endswith("B>A")
    assert "chosen" not in records[2] and len(records[2]["replies"]) == 2
    first_items = {r["meta"]["item"] for r in records}
    assert len(first_items) == 3

    # the second session in-process (a subprocess costs seconds of imports)
    shown = label_in_process(workdir, tiny_model_dir, "s\na\nq\n", monkeypatch, capsys)
    assert "2 of 5 prompts left" in shown
    for item in first_items:
        assert item not in shown  # nothing already judged is shown again
    new = read_jsonl(labels)[len(records):]
    assert [r["meta"]["judgement"] for r in new] == ["skip", "prefer"]
    assert not {r["meta"]["item"] for r in new} & first_items

    judgements = Counter()
    pairs = list(read_labels(labels.parent, SkipLog(), judgements))
    assert len(pairs) == 3 and judgements == {"prefer": 3, "tie": 1, "skip": 1}


def label_in_process(workdir, model_dir, answers: str, monkeypatch, capsys, *extra: str) -> str:
    from chatforge.cli import main

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers))
    main(["label", "--annotator", "tester", "--conversations", "val.jsonl", "--models", str(model_dir), *extra])
    return capsys.readouterr().err


def test_ranking_mode_writes_all_pairs_of_a_ranking(workdir, tiny_model_dir, monkeypatch, capsys):
    label_in_process(workdir, tiny_model_dir, "1 2\n2 3 1\n", monkeypatch, capsys,
                     "--annotator", "ranker", "--mode", "ranking", "--limit", "1")
    records = read_jsonl(workdir / "data/labels/ranker.jsonl")
    assert len(records) == 3  # k = 3 from params: 3 * 2 / 2 pairs, all for one item
    assert {r["meta"]["item"] for r in records} == {records[0]["meta"]["item"]}
    assert [r["id"].rsplit(":", 1)[1] for r in records] == ["2>3", "2>1", "3>1"]
    assert [tuple(r["meta"]["ranks"].values()) for r in records] == [(1, 2), (1, 3), (2, 3)]
    for record in records:
        check_preference(record)
        assert record["meta"]["mode"] == "ranking"
    # reply 2 is preferred over both others: the same text is chosen twice
    assert records[0]["chosen"] == records[1]["chosen"] and records[1]["rejected"] == records[2]["rejected"]


def test_parse_ranking():
    assert parse_ranking("2 1 3", 3) == [1, 0, 2]
    assert parse_ranking("3,1,2", 3) == [2, 0, 1]
    assert parse_ranking("1 1 2", 3) is None and parse_ranking("1 2", 3) is None and parse_ranking("", 3) is None
    assert parse_ranking("s", 3) == "skip" and parse_ranking("quit", 3) == "quit"


def test_bad_annotator_name_is_one_line(workdir, tiny_model_dir):
    result = label(workdir, tiny_model_dir, "", "--annotator", "../evil")
    assert result.returncode == 1 and "--annotator" in result.stderr and "Traceback" not in result.stderr
