"""The oasst source on small files in OpenAssistant's two export shapes (message table, tree export)."""
from __future__ import annotations

import gzip
import json

import pytest

from chatforge.conversation import check_conversation, check_preference
from test_sources import load, write_jsonl


def message(message_id, parent, role, text, rank=None, lang="en", tree="p1", **fields):
    """A message as the oasst1 message table writes it (the fields the source ignores included)."""
    return {"message_id": message_id, "parent_id": parent, "user_id": "u-" + message_id, "created_date":
            "2023-02-05T14:23:50.983374+00:00", "text": text, "role": role, "lang": lang, "review_count": 3,
            "review_result": True, "deleted": False, "rank": rank, "synthetic": False, "model_name": None,
            "detoxify": None, "message_tree_id": tree, "tree_state": "ready_for_export", "emojis": None,
            "labels": None, **fields}


# Prompt p1 with three ranked replies (a0 best), a deleted one and a spam one; a0 has a follow-up question
# with two ranked replies, one of them unranked (added after the ranking).
TABLE = [
    message("p1", None, "prompter", "What is a monad?"),
    message("a1", "p1", "assistant", "A design pattern from category theory.", rank=1),
    message("a0", "p1", "assistant", "A monad wraps values and chains computations on them.", rank=0),
    message("a2", "p1", "assistant", "Something in Haskell.", rank=2),
    message("ax", "p1", "assistant", "deleted reply", rank=3, deleted=True),
    message("as", "p1", "assistant", "buy cheap pills", review_result=False),
    message("q0", "a0", "prompter", "Can you give an example?", rank=0),
    message("b0", "q0", "assistant", "Maybe in Haskell: Just 3 >>= f.", rank=0),
    message("b1", "q0", "assistant", "Lists are monads too.", rank=1),
    message("bu", "q0", "assistant", "Unranked late reply."),
    message("c0", "ax", "prompter", "Under a deleted reply"),
    message("o1", "gone", "assistant", "Reply to a message not in the file"),
    message("p2", None, "prompter", "¿Qué es una mónada?", lang="es", tree="p2"),
    message("e0", "p2", "assistant", "Un patrón de diseño.", lang="es", tree="p2"),
]


def test_message_table_best_path_pairs_and_counted_skips(tmp_path):
    path = write_jsonl(tmp_path / "2023-04-12_oasst_ready.messages.jsonl", TABLE)
    records, skips = load("oasst", path=str(path))
    chats = [r for r in records if "turns" in r]
    pairs = {r["id"]: r for r in records if "chosen" in r}
    monad = next(c for c in chats if c["id"] == "oasst:p1")
    assert [t["content"] for t in monad["turns"]] == [
        "What is a monad?", "A monad wraps values and chains computations on them.", "Can you give an example?",
        "Maybe in Haskell: Just 3 >>= f."]
    assert [t["role"] for t in monad["turns"]] == ["user", "assistant", "user", "assistant"]
    assert monad["meta"]["language"] == "en" and monad["meta"]["message_ids"] == ["p1", "a0", "q0", "b0"]
    spanish = next(c for c in chats if c["id"] == "oasst:p2")
    assert spanish["meta"]["language"] == "es"  # the clean stage's language hint
    # all pairs of the ranked set {a0, a1, a2}, and of {b0, b1}, whose prompt is the conversation so far
    assert set(pairs) == {"oasst:a0>a1", "oasst:a0>a2", "oasst:a1>a2", "oasst:b0>b1"}
    assert pairs["oasst:a0>a2"]["chosen"] == [{"role": "assistant", "content": monad["turns"][1]["content"]}]
    assert pairs["oasst:b0>b1"]["prompt"] == monad["turns"][:3]
    assert pairs["oasst:a1>a2"]["meta"] == {"format": "oasst", "tree": "p1", "language": "en", "chosen_rank": 1,
                                            "rejected_rank": 2}
    assert skips.counts == {"deleted": 1, "failed_review": 1, "unranked": 1, "parent_dropped": 1,
                            "missing_parent": 1}
    assert all(check_conversation(c) for c in chats) and all(check_preference(p) for p in pairs.values())


def test_adjacent_pairs_languages_and_ties(tmp_path):
    table = TABLE + [message("t0", "p2", "assistant", "Otra respuesta.", lang="es", tree="p2")]  # e0 and t0 now unranked
    path = write_jsonl(tmp_path / "messages.jsonl", table)
    records, skips = load("oasst", path=str(path), pairs="adjacent", languages=["en"])
    assert sorted(r["id"] for r in records if "chosen" in r) == ["oasst:a0>a1", "oasst:a1>a2", "oasst:b0>b1"]
    assert skips.counts["other_language"] == 1 and skips.counts["parent_dropped"] == 3  # p2's replies, c0

    tied = [message("p", None, "prompter", "Hi"), message("x", "p", "assistant", "Hello", rank=0),
            message("y", "p", "assistant", "Hey", rank=0)]
    records, skips = load("oasst", path=str(write_jsonl(tmp_path / "tied.jsonl", tied)), conversations=False)
    assert records == [] and skips.counts == {"tied_rank": 1}


def tree_export_line() -> dict:
    """The same monad tree as the tree export writes it: nested `replies`, ids only where they are."""
    by_id = {m["message_id"]: dict(m) for m in TABLE if m["message_tree_id"] == "p1"}
    for m in by_id.values():
        m["replies"] = []
    for m in TABLE:
        if m["parent_id"] in by_id and m["message_id"] in by_id:
            by_id[m["parent_id"]]["replies"].append(by_id[m["message_id"]])
    return {"message_tree_id": "p1", "tree_state": "ready_for_export", "prompt": by_id["p1"], "origin": None}


def test_tree_export_gives_what_the_table_gives(tmp_path):
    tree_path = tmp_path / "2023-04-12_oasst_ready.trees.jsonl.gz"
    with gzip.open(tree_path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(tree_export_line()) + "\n" + json.dumps({"neither": 1}) + "\n")
    from_trees, skips = load("oasst", path=str(tree_path))
    table = [m for m in TABLE if m["message_tree_id"] == "p1" and m["parent_id"] != "gone"]
    from_table, _ = load("oasst", path=str(write_jsonl(tmp_path / "table.jsonl", table)))
    assert from_trees == from_table and len(from_trees) == 5
    assert skips.counts["unknown_shape"] == 1 and f"{tree_path}:2: unknown_shape" in "\n".join(skips.examples)


def test_hub_table_float_ranks_and_bad_rows(tmp_path):
    rows = [message("p", None, "prompter", "Hi"), message("x", "p", "assistant", "Hello", rank=0.0),
            message("y", "p", "assistant", "Hey", rank=1.0), message("z", "p", "assistant", "Yo", rank="first"),
            {**message("w", "p", "assistant", "Hm"), "role": "bot"}]
    records, skips = load("oasst", path=str(write_jsonl(tmp_path / "hub.jsonl", rows)))
    assert [r["id"] for r in records] == ["oasst:p", "oasst:x>y"]
    assert skips.counts == {"bad_field": 1, "bad_role": 1}


def test_bad_options_name_the_key(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", TABLE)
    with pytest.raises(Exception, match="test.pairs"):
        load("oasst", path=str(path), pairs="best")
    with pytest.raises(Exception, match="needs conversations or preferences"):
        load("oasst", path=str(path), conversations=False, preferences=False)
