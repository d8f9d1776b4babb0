"""Shards between collect and clean (chatforge.shards): round trip, rotation, empty kinds, bad input, interruption."""
from __future__ import annotations

import gzip
import json

import pytest

from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog
from chatforge.shards import ShardWriter, iter_records, shard_paths


def records(count: int) -> list[dict]:
    return [{"id": f"t:{i}", "source": "t", "text": f"record {i} é", "meta": {"i": i}} for i in range(count)]


def write(folder, rows, per_shard):
    with ShardWriter(folder, per_shard) as writer:
        for row in rows:
            writer.write(row)
    return writer


def read(folder) -> tuple[list[str], list[dict], SkipLog]:
    skips = SkipLog()
    pairs = list(iter_records(folder, skips))
    return [where for where, _ in pairs], [record for _, record in pairs], skips


def test_round_trip_with_rotation_keeps_order(tmp_path):
    rows = records(25)
    writer = write(tmp_path / "docs", rows, per_shard=10)
    assert (writer.records, writer.shards) == (25, 3)
    assert [p.name for p in shard_paths(tmp_path / "docs")] == ["part-00000.jsonl.gz", "part-00001.jsonl.gz",
                                                                  "part-00002.jsonl.gz"]
    wheres, back, skips = read(tmp_path / "docs")
    assert back == rows and skips.total == 0
    assert wheres[0] == f"{tmp_path / 'docs' / 'part-00000.jsonl.gz'}:1"
    assert wheres[24] == f"{tmp_path / 'docs' / 'part-00002.jsonl.gz'}:5"


@pytest.mark.parametrize("count, shards", [(1, 1), (9, 1), (10, 1), (11, 2), (20, 2), (21, 3)])
def test_rotation_boundaries(tmp_path, count, shards):
    writer = write(tmp_path / "docs", records(count), per_shard=10)
    paths = shard_paths(tmp_path / "docs")
    assert writer.shards == len(paths) == shards
    sizes = [len(gzip.decompress(p.read_bytes()).splitlines()) for p in paths]
    assert sizes == [10] * (shards - 1) + [count - 10 * (shards - 1)]  # no empty trailing shard


def test_empty_kind_has_one_empty_shard(tmp_path):
    writer = write(tmp_path / "prefs", [], per_shard=10)
    assert (writer.records, writer.shards) == (0, 1)
    assert [p.name for p in shard_paths(tmp_path / "prefs")] == ["part-00000.jsonl.gz"]
    assert read(tmp_path / "prefs")[1] == []


def test_same_records_give_the_same_bytes(tmp_path):
    """No timestamp or temp name in the gzip header: DVC sees an unchanged output as unchanged."""
    write(tmp_path / "a", records(5), per_shard=10)
    write(tmp_path / "b", records(5), per_shard=10)
    assert (tmp_path / "a/part-00000.jsonl.gz").read_bytes() == (tmp_path / "b/part-00000.jsonl.gz").read_bytes()


def test_bad_lines_are_counted_with_shard_and_line(tmp_path):
    write(tmp_path / "docs", records(2), per_shard=10)
    shard = tmp_path / "docs" / "part-00000.jsonl.gz"
    with gzip.open(shard, "ab") as handle:  # a second gzip member, as a concatenation would add
        handle.write(b'{"id": "cut\n[1]\n' + json.dumps(records(3)[2]).encode() + b"\n")
    _, back, skips = read(tmp_path / "docs")
    assert back == records(3)
    assert skips.counts == {"bad_json": 1, "not_an_object": 1}
    assert skips.examples[0].startswith(f"{shard}:3: bad_json")


def test_cut_off_shard_is_one_error_naming_it(tmp_path):
    write(tmp_path / "docs", records(2000), per_shard=5000)
    shard = tmp_path / "docs" / "part-00000.jsonl.gz"
    shard.write_bytes(shard.read_bytes()[:-200])
    with pytest.raises(ChatforgeError, match=r"part-00000.jsonl.gz: unreadable gzip after line \d+ .*re-run"):
        read(tmp_path / "docs")


def test_missing_folder_is_one_error(tmp_path):
    with pytest.raises(ChatforgeError, match="nowhere: not found"):
        shard_paths(tmp_path / "nowhere")


def test_interrupted_writer_leaves_nothing_and_keeps_the_previous_folder(tmp_path):
    write(tmp_path / "docs", records(3), per_shard=2)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "docs", 2) as writer:
            for row in records(7):
                writer.write(row)
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # no temporary folder left
    assert read(tmp_path / "docs")[1] == records(3)


def test_a_new_folder_is_invisible_until_closed(tmp_path):
    with ShardWriter(tmp_path / "docs", 2) as writer:
        writer.write(records(1)[0])
        assert not (tmp_path / "docs").exists()
    assert read(tmp_path / "docs")[1] == records(1)
