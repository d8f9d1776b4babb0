import json
import sysconfig
from pathlib import Path

from chatforge.collect import portable
from chatforge.metrics import flatten
from chatforge.provenance import HARDWARE_FIELDS, KEY, hardware, write_report


def test_stage_report_records_where_it_ran_and_stays_out_of_metrics(tmp_path):
    write_report(tmp_path / "r.json", {"accuracy": 0.5})
    report = json.loads((tmp_path / "r.json").read_text())
    recorded = report[KEY]
    assert set(HARDWARE_FIELDS) <= set(recorded) and recorded["packages"]["torch"]
    assert all(isinstance(value, str) for value in recorded.values() if not isinstance(value, dict))
    assert hardware(report) == {field: recorded[field] for field in HARDWARE_FIELDS}
    assert flatten(report) == {"accuracy": 0.5}  # never a metric
    assert hardware({"accuracy": 0.5}) is None


def test_skip_examples_name_no_machine_path():
    site = sysconfig.get_paths()["purelib"]
    assert portable(f"{site}/chatterbot_corpus/data/english/ai.yml:3: not_a_list") == \
        "chatterbot_corpus/data/english/ai.yml:3: not_a_list"
    assert portable(f"{Path.cwd()}/data/external/chats.jsonl:9: bad_json") == "data/external/chats.jsonl:9: bad_json"
    assert portable("data/external/chats.jsonl:9: bad_json") == "data/external/chats.jsonl:9: bad_json"
    assert portable("/elsewhere/chats.jsonl:9: bad_json") == "/elsewhere/chats.jsonl:9: bad_json"  # as params wrote it
