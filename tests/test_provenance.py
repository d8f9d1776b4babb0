import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from chatforge.collect import portable
from chatforge.metrics import flatten
from chatforge.provenance import HARDWARE_FIELDS, KEY, PEAK_MEMORY, hardware, peak_memory, peak_rss_mb, write_report


def test_stage_report_records_where_it_ran_and_stays_out_of_metrics(tmp_path):
    write_report(tmp_path / "r.json", {"accuracy": 0.5})
    report = json.loads((tmp_path / "r.json").read_text())
    recorded = report[KEY]
    assert set(HARDWARE_FIELDS) <= set(recorded) and recorded["packages"]["torch"]
    assert all(isinstance(value, str) for value in recorded.values() if not isinstance(value, dict))
    assert hardware(report) == {field: recorded[field] for field in HARDWARE_FIELDS}
    assert flatten(report) == {"accuracy": 0.5}  # never a metric
    assert hardware({"accuracy": 0.5}) is None


def test_stage_report_records_its_peak_memory_children_included(tmp_path):
    child_megabytes = 300
    subprocess.run([sys.executable, "-c", f"held = b'x' * {child_megabytes * 10**6}"], check=True)  # resident
    write_report(tmp_path / "r.json", {"accuracy": 0.5})
    report = json.loads((tmp_path / "r.json").read_text())
    peak = report[KEY][PEAK_MEMORY]
    assert peak["children_rss_mb"] > child_megabytes  # the child's peak, though it has exited
    assert peak["rss_mb"] >= peak["children_rss_mb"] and peak["rss_mb"] > 100  # this process has torch loaded
    assert peak_rss_mb(report) == peak["rss_mb"] and peak_rss_mb({"accuracy": 0.5}) is None
    assert flatten(report) == {"accuracy": 0.5}  # a resource, never a metric


def test_peak_gpu_memory_is_recorded_only_where_cuda_is(monkeypatch):
    assert "cuda_allocated_mb" not in peak_memory() or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 1_234_567_890)
    assert peak_memory()["cuda_allocated_mb"] == 1234.6


def test_skip_examples_name_no_machine_path():
    site = sysconfig.get_paths()["purelib"]
    assert portable(f"{site}/chatterbot_corpus/data/english/ai.yml:3: not_a_list") == \
        "chatterbot_corpus/data/english/ai.yml:3: not_a_list"
    assert portable(f"{Path.cwd()}/data/external/chats.jsonl:9: bad_json") == "data/external/chats.jsonl:9: bad_json"
    assert portable("data/external/chats.jsonl:9: bad_json") == "data/external/chats.jsonl:9: bad_json"
    assert portable("/elsewhere/chats.jsonl:9: bad_json") == "/elsewhere/chats.jsonl:9: bad_json"  # as params wrote it
