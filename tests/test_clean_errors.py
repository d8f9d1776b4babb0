"""Bad input on the clean side: one clear line (ChatforgeError) or a counted, reported skip."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from chatforge.errors import ChatforgeError
from clean_helpers import chat, clean, config, write_raw

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, message", [
    ({"near_dedup": {"threshold": 1.5}}, "clean.near_dedup.threshold must be in (0, 1)"),
    ({"near_dedup": {"num_perm": 0}}, "clean.near_dedup.num_perm must be >= 2"),
    ({"language": {"min_probability": -0.1}}, "clean.language.min_probability must be in [0, 1]"),
    ({"split": {"train": 0.9, "val": 0.2, "test": 0.05}}, "clean.split fractions must sum to 1"),
    ({"split": {"by": "random"}}, "clean.split.by='random': expected one of ['prompt', 'id']"),
    ({"pii": {"types": ["email", "ssn"]}}, "clean.pii.types has unknown type ['ssn']"),
    ({"tasks": "two"}, "clean.tasks='two': expected int"),
    ({"workers": 0}, "clean.workers must be >= 1"),
    ({"executor": "spark"}, "clean.executor='spark': expected one of ['local', 'slurm', 'ray']"),
    ({"executor": "slurm", "slurm": {"partition": "cpu", "time": "1:00:00", "partiton": "x"}},
     "clean.slurm.partiton is not a SlurmPipelineExecutor option"),
    ({"executor": "slurm", "slurm": {"partition": "cpu"}}, "clean.slurm needs ['time']"),
    ({"executor": "ray", "ray": {"tasks": 4}}, "clean.ray.tasks is not a RayPipelineExecutor option"),
    ({"quality": {"max_symbol_ratio": 0}}, "clean.quality.max_symbol_ratio must be in (0, 1]"),
    ({"language": {"short_text": "guess"}}, "clean.language.short_text='guess': expected one of"),
])
def test_bad_params_value_is_one_line(overrides, message):
    with pytest.raises(ChatforgeError) as error:
        config(**overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, key", [({"dedupe": True}, "clean.dedupe"),
                                            ({"pii": {"spacy": "x"}}, "clean.pii.spacy")])
def test_unknown_key_is_named(overrides, key):
    with pytest.raises(ChatforgeError, match=f"unknown key {key};"):
        config(**overrides)


def test_missing_raw_data_says_run_collect(tmp_path, monkeypatch):
    import stages.clean

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatforgeError, match=r"data/raw/conversations: not found; run the collect stage"):
        stages.clean.main.__wrapped__()


def test_bad_lines_are_skipped_and_counted(tmp_path, monkeypatch):
    import stages.clean

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    write_raw(tmp_path, [chat("ok", "How are you today, my friend?", "I am well, thank you for asking!", language="en")])
    with gzip.open(tmp_path / "data/raw/conversations/part-00000.jsonl.gz", "ab") as raw:  # a second gzip member
        raw.write(b'{"id": "cut\n[1, 2]\n\xff\xfe{"id": "latin"}\n')
    monkeypatch.chdir(tmp_path)
    stages.clean.main.__wrapped__()
    skipped = json.loads((tmp_path / "reports/clean.json").read_text())["skipped_lines"]
    assert skipped["by_reason"] == {"bad_json": 1, "not_an_object": 1, "bad_encoding": 1}
    assert any("part-00000.jsonl.gz:2" in example for example in skipped["examples"])


def test_wrong_types_and_empty_text_are_counted_not_fatal(tmp_path):
    records = [
        {"id": "list-content", "turns": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
        {"id": "turns-not-list", "turns": "Hello"},
        {"id": "empty", "turns": [{"role": "user", "content": ""}, {"role": "assistant", "content": "\u200b\t"}]},
        {"id": "no-user", "turns": [{"role": "assistant", "content": "I talk alone"}] * 2},
        {"id": 7, "turns": [{"role": "user", "content": "a"}]},
    ]
    documents = [{"id": "d", "text": None}, {"id": "blank", "text": "   \n "}]
    result = clean(tmp_path, config(), records, documents)
    assert result.report["dropped"]["conversation"] == {
        "structure/non_string_content": 1, "structure/no_turns": 1, "normalize/empty_text": 1,
        "structure/missing_user_or_assistant": 1, "structure/missing_id": 1}
    assert result.report["dropped"]["document"] == {"structure/non_string_content": 1, "structure/empty_text": 1}
    assert all(d["stage"] in ("structure", "normalize") and d["reason"] for d in result.dropped)


def test_duplicate_ids_are_counted(tmp_path):
    records = [chat("same", "How are you doing today?", "Fine, and you?"),
               chat("same", "What time is it now?", "Time for tea, I think.")]
    result = clean(tmp_path, config(language={"enabled": False}), records)
    assert result.report["dropped"]["conversation"] == {"structure/duplicate_id": 1}
