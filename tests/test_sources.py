"""Every source type on a small file in its real format, written here; plus the shared real corpora."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from chatforge.conversation import check_conversation, check_document, check_preference
from chatforge.files import SkipLog
from chatforge.params import from_dict
from chatforge.sources import SOURCE_TYPES, source_module
from conftest import corpus_path


def load(source_type: str, **options) -> tuple[list[dict], SkipLog]:
    """Run one source as collect would (config from a params-like mapping); records and skips."""
    module = source_module(source_type)
    config = from_dict(module.Config, {"type": source_type, "name": source_type, **options}, "test")
    skips = SkipLog()
    return [record for _, record in module.load(config, skips)], skips


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def contents(record: dict) -> list[str]:
    return [t["content"] for t in record["turns"]]


def test_registry_lists_every_module():
    for source_type in SOURCE_TYPES:
        module = source_module(source_type)
        assert hasattr(module, "Config") and hasattr(module, "load")


def test_chatterbot_package_corpus_by_language():
    records, skips = load("chatterbot", languages=["english"])
    assert len(records) > 500
    food = next(r for r in records if r["id"] == "chatterbot:english/food:0")
    assert food["meta"]["language"] == "english" and food["meta"]["categories"] == ["food"]
    assert food["turns"][0] == {"role": "user", "content": "do you drink"}
    assert food["turns"][1]["role"] == "assistant"
    assert {r["meta"]["language"] for r in records} == {"english"}
    assert all(check_conversation(r) for r in records)


def test_chatterbot_yaml_scalars_kept_as_written(tmp_path):
    (tmp_path / "english").mkdir()
    (tmp_path / "english" / "numbers.yml").write_text(
        "categories:\n- numbers\nconversations:\n"
        "- - what is pi\n  - 3.10\n  - yes\n"          # would become 3.1 and True if resolved
        "- - nested\n  - - a\n    - b\n"              # a list as a line: skipped
        "- - alone\n", encoding="utf-8")
    records, skips = load("chatterbot", path=str(tmp_path))
    assert len(records) == 1
    assert contents(records[0]) == ["what is pi", "3.10", "yes"]
    assert [t["role"] for t in records[0]["turns"]] == ["user", "assistant", "user"]
    assert records[0]["id"] == "chatterbot:english/numbers:0"
    assert skips.counts == {"non_string_turn": 1, "too_few_turns": 1}
    assert skips.examples[0].startswith(f"{tmp_path / 'english' / 'numbers.yml'}:7")


def test_jsonl_detects_each_shape_per_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": "a1", "turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
         "meta": {"topic": "greeting"}},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]},
        {"conversations": [{"from": "human", "value": "Name a colour"}, {"from": "gpt", "value": "Blue"}]},
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"prompt": "Best pet?", "chosen": "A cat.", "rejected": "No idea."},
        {"something": "else"},
    ])
    records, skips = load("jsonl", path=str(path))
    ours, openai, sharegpt, alpaca, pref = records
    assert ours["id"] == "jsonl:a1" and ours["meta"]["topic"] == "greeting" and ours["meta"]["line"] == 1
    assert [t["role"] for t in openai["turns"]] == ["system", "user", "assistant"] and contents(openai)[2] == "4"
    assert openai["id"] == f"jsonl:{path}:2"
    assert sharegpt["turns"] == [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}]
    assert contents(alpaca) == ["Translate to French\n\ncat", "chat"] and alpaca["meta"]["format"] == "alpaca"
    assert check_preference(pref)["chosen"] == [{"role": "assistant", "content": "A cat."}]
    assert skips.counts == {"unknown_shape": 1} and skips.examples[0].startswith(f"{path}:6")


def test_jsonl_reads_a_json_array_file(tmp_path):
    """Alpaca's alpaca_data.json and ShareGPT dumps are one indented JSON array, not JSONL."""
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        ["not", "an", "object"],
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ], indent=4), encoding="utf-8")
    records, skips = load("jsonl", path=str(path))
    assert [contents(r) for r in records] == [["Give three tips for staying healthy.", "1. Eat well."],
                                             ["Translate to French\n\ncat", "chat"], ["Hi", "Hello"]]
    assert records[1]["meta"]["line"] == 7 and records[1]["id"] == f"jsonl:{path}:7"  # the line it starts on
    assert skips.counts == {"not_an_object": 1} and skips.examples[0].startswith(f"{path}:12")

    broken = tmp_path / "broken.json.gz"
    with gzip.open(broken, "wt", encoding="utf-8") as handle:
        handle.write('[\n{"instruction": "a", "output": "b"},\n{"instruction": oops},\n{"instruction": "c", "output": "d"}]')
    records, skips = load("jsonl", path=str(broken))
    assert len(records) == 1 and skips.counts == {"bad_json": 1} and skips.examples[0].startswith(f"{broken}:3")


def test_jsonl_reads_a_pretty_printed_json_object_as_one_record(tmp_path):
    """A `.json` file holding one ShareGPT conversation over many lines is one record, not a bad_json per line;
    objects printed one after another (as `jq` does) are one record each; JSONL stays line by line."""
    conversation = {"id": "sg-1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                                    {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]}
    single = tmp_path / "conversation.json"
    single.write_text(json.dumps(conversation, indent=2) + "\n", encoding="utf-8")
    assert len(single.read_text().splitlines()) > 20
    records, skips = load("jsonl", path=str(single))
    assert [contents(r) for r in records] == [["Hi", "Hello", "Bye", "Bye!"]] and skips.total == 0
    assert records[0]["id"] == "jsonl:sg-1" and records[0]["meta"]["line"] == 1

    first_line_keyed = tmp_path / "keyed.json"  # some formatters put the first key on the `{` line
    first_line_keyed.write_text('{"conversations": [\n  {"from": "human", "value": "Hi"},\n  '
                                '{"from": "gpt", "value": "Hello"}\n]}\n', encoding="utf-8")
    assert load("jsonl", path=str(first_line_keyed))[0][0]["turns"][1]["content"] == "Hello"

    stream = tmp_path / "jq_output.jsonl"
    second = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    stream.write_text(json.dumps(conversation, indent=2) + "\n" + json.dumps(second, indent=2), encoding="utf-8")
    records, skips = load("jsonl", path=str(stream))
    assert [contents(r) for r in records] == [["Hi", "Hello", "Bye", "Bye!"], ["2+2?", "4"]] and skips.total == 0
    assert records[1]["meta"]["line"] == len(json.dumps(conversation, indent=2).splitlines()) + 1

    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "conversations": [\n    {"from": "human", "value": oops}\n  ]\n}\n', encoding="utf-8")
    records, skips = load("jsonl", path=str(broken))
    assert records == [] and skips.counts == {"bad_json": 1} and skips.examples[0].startswith(f"{broken}:1")

    dump = tmp_path / "dump.jsonl"  # a bad first line of a dump is one skip; the other lines are read
    dump.write_text('{"messages": [oops\n' + json.dumps(second) + "\n", encoding="utf-8")
    records, skips = load("jsonl", path=str(dump))
    assert len(records) == 1 and skips.counts == {"bad_json": 1}


def test_reddit_thread_from_zst_dump(tmp_path):
    import zstandard

    submission = {"id": "s1", "title": "Favourite pasta?", "selftext": "Asking for dinner &amp; fun.",
                  "score": 10, "subreddit": "cooking", "permalink": "/r/cooking/comments/s1/x/"}
    comments = [
        {"id": "c1", "parent_id": "t3_s1", "link_id": "t3_s1", "body": "Carbonara", "score": 5, "subreddit": "cooking"},
        {"id": "c2", "parent_id": "t1_c1", "link_id": "t3_s1", "body": "With guanciale?", "score": 3},
        {"id": "c3", "parent_id": "t1_c1", "link_id": "t3_s1", "body": "Meh", "score": 1},  # lower: not followed
        {"id": "c4", "parent_id": "t1_c2", "link_id": "t3_s1", "body": "Always.", "score": 2},
        {"id": "d1", "parent_id": "t3_s1", "link_id": "t3_s1", "body": "[deleted]", "score": 4},
        {"id": "d2", "parent_id": "t1_d1", "link_id": "t3_s1", "body": "reply to a deleted comment", "score": 3},
        {"id": "low", "parent_id": "t3_s1", "link_id": "t3_s1", "body": "downvoted", "score": -3},
    ]
    lines = "".join(json.dumps(row) + "\n" for row in [submission, *comments]).encode()
    path = tmp_path / "RC_test.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    records, skips = load("reddit", path=str(path), min_score=1)
    assert len(records) == 1
    thread = records[0]
    assert thread["id"] == "reddit:c1"
    assert contents(thread) == ["Favourite pasta?\n\nAsking for dinner & fun.", "Carbonara", "With guanciale?", "Always."]
    assert [t["role"] for t in thread["turns"]] == ["user", "assistant", "user", "assistant"]
    assert thread["meta"]["subreddit"] == "cooking" and thread["meta"]["url"].endswith("/r/cooking/comments/s1/x/")
    assert skips.counts == {"deleted_or_removed": 1, "low_score": 1, "parent_dropped": 1}


POSTS_XML = """\ufeff<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" AcceptedAnswerId="3" Score="7" Title="How do I reverse a list?"
       Body="&lt;p&gt;I have &lt;code&gt;xs&lt;/code&gt; &amp;amp; want it reversed.&lt;/p&gt;" Tags="&lt;python&gt;&lt;list&gt;" />
  <row Id="2" PostTypeId="2" ParentId="1" Score="50" Body="&lt;p&gt;Popular but not accepted.&lt;/p&gt;" />
  <row Id="3" PostTypeId="2" ParentId="1" Score="5"
       Body="&lt;p&gt;Use slicing:&lt;/p&gt;&lt;pre&gt;&lt;code&gt;ys = xs[::-1]&#xA;print(ys)&lt;/code&gt;&lt;/pre&gt;&lt;ul&gt;&lt;li&gt;fast&lt;/li&gt;&lt;li&gt;simple&lt;/li&gt;&lt;/ul&gt;" />
  <row Id="4" PostTypeId="1" Score="2" Title="Tabs or spaces?" Body="&lt;p&gt;Which one?&lt;/p&gt;" />
  <row Id="5" PostTypeId="2" ParentId="4" Score="3" Body="&lt;p&gt;Spaces.&lt;/p&gt;" />
  <row Id="6" PostTypeId="2" ParentId="4" Score="9" Body="&lt;p&gt;Tabs&lt;br/&gt;always.&lt;/p&gt;" />
  <row Id="7" PostTypeId="2" ParentId="4" Score="0" Body="&lt;p&gt;Who cares&lt;/p&gt;" />
  <row Id="8" PostTypeId="5" Score="0" Body="tag wiki" />
</posts>
"""


def test_stackexchange_accepted_else_top_answer(tmp_path):
    path = tmp_path / "Posts.xml"
    path.write_text(POSTS_XML, encoding="utf-8")
    records, skips = load("stackexchange", path=str(path), min_score=1, site="example.stackexchange.com")
    reverse, tabs = records
    assert reverse["turns"][0]["content"] == "How do I reverse a list?\n\nI have `xs` & want it reversed."
    assert reverse["turns"][1]["content"] == "Use slicing:\n\n```\nys = xs[::-1]\nprint(ys)\n```\n\n- fast\n- simple"
    assert reverse["meta"]["accepted"] is True and reverse["meta"]["tags"] == ["python", "list"]
    assert reverse["meta"]["url"] == "https://example.stackexchange.com/questions/1"
    assert tabs["turns"][1]["content"] == "Tabs\nalways." and tabs["meta"]["accepted"] is False
    assert skips.counts == {"low_score": 1}
    assert skips.examples[0].startswith(f"{path}:11")


def test_twitter_chain_with_handles_and_urls(tmp_path):
    path = write_jsonl(tmp_path / "tweets.jsonl", [
        {"id": 1, "text": "Anyone tried the new café on Main St? https://t.co/abc", "in_reply_to_status_id": None},
        {"id": 2, "text": "@alice yes! ask @bob_99 about it &amp; the cake", "in_reply_to_status_id": 1},
        {"id": "3", "text": "@carol @alice thanks, see www.example.com", "in_reply_to_status_id": "2"},
        {"id": 4, "text": "just a standalone tweet", "in_reply_to_status_id": None},
    ])
    records, skips = load("twitter", path=str(path))
    assert len(records) == 1 and records[0]["id"] == "twitter:1"
    assert contents(records[0]) == ["Anyone tried the new café on Main St? <url>",
                                    "yes! ask @user about it & the cake", "thanks, see <url>"]
    assert records[0]["meta"]["tweet_ids"] == ["1", "2", "3"]
    assert skips.counts == {"too_few_turns": 1}


def test_twitter_extended_text_and_mongodb_ids(tmp_path):
    """v1.1 streaming tweets over 140 characters keep the whole text in extended_tweet.full_text; mongoexport
    writes 64-bit ids as {"$numberLong": "…"}, only the *_str fields plain (and null ones on a root)."""
    long_text = "A thread about sourdough: feed the starter twice a day, keep it warm, and wait for it to double " \
                "before you bake, or the loaf will come out flat and dense."
    path = write_jsonl(tmp_path / "mongo_tweets.jsonl", [
        {"_id": {"$oid": "5f1d7a"}, "id": {"$numberLong": "1283456789012345678"}, "id_str": "1283456789012345678",
         "text": long_text[:117] + "… https://t.co/x", "truncated": True, "extended_tweet": {"full_text": long_text},
         "in_reply_to_status_id": None, "in_reply_to_status_id_str": None},
        {"_id": {"$oid": "5f1d7b"}, "id": {"$numberLong": "1283456789012345999"},
         "text": "@baker how warm is warm?", "in_reply_to_status_id": {"$numberLong": "1283456789012345678"},
         "in_reply_to_status_id_str": None},
    ])
    records, skips = load("twitter", path=str(path))
    assert len(records) == 1 and not skips.total
    assert contents(records[0]) == [long_text, "how warm is warm?"]
    assert records[0]["meta"]["tweet_ids"] == ["1283456789012345678", "1283456789012345999"]


def test_text_chunks_whole_paragraphs(tmp_path):
    paragraphs = [f"Paragraph {i}.\n" + "word " * (20 + i) for i in range(30)]
    path = tmp_path / "book.txt"
    path.write_text("\r\n\r\n".join(paragraphs).replace("\n", "\r\n"), encoding="utf-8")
    records, skips = load("text", path=str(tmp_path / "*.txt"), max_chars=400)
    assert len(records) > 5 and not skips.total
    assert all(len(r["text"]) <= 400 and check_document(r) for r in records)
    assert [r["id"] for r in records[:2]] == [f"text:{path}:0", f"text:{path}:1"]
    assert records[0]["text"].startswith("Paragraph 0.\nword") and "\r" not in records[0]["text"]
    joined = "\n\n".join(r["text"] for r in records)
    assert joined == "\n\n".join(p.rstrip() for p in paragraphs)  # nothing lost, nothing reordered


def test_cornell_crlf_latin1(tmp_path):
    sep = " +++$+++ "
    lines = [f"L1{sep}u0{sep}m0{sep}BIANCA{sep}Où est le café?", f"L2{sep}u1{sep}m0{sep}CAMERON{sep}Right\x85there.",
             f"L3{sep}u0{sep}m0{sep}BIANCA{sep}Merci. ", f"L9{sep}u2{sep}m1{sep}JOE{sep}Hey"]
    (tmp_path / "movie_lines.txt").write_bytes("\r\n".join(lines).encode("latin-1") + b"\r\n")
    (tmp_path / "movie_conversations.txt").write_bytes(
        f"u0{sep}u1{sep}m0{sep}['L1', 'L2', 'L3']\r\nu2{sep}u3{sep}m1{sep}['L9']\r\n".encode("latin-1"))
    (tmp_path / "movie_titles_metadata.txt").write_text(
        f"m0{sep}10 things i hate about you{sep}1999{sep}6.90{sep}62847{sep}['comedy', 'romance']\n", encoding="utf-8")
    records, skips = load("cornell", path=str(tmp_path))
    assert len(records) == 1
    movie = records[0]
    assert movie["id"] == "cornell:m0:L1"
    assert contents(movie) == ["Où est le café?", "Right\x85there.", "Merci."]
    assert [t["role"] for t in movie["turns"]] == ["user", "assistant", "user"]
    assert movie["meta"]["title"] == "10 things i hate about you" and movie["meta"]["year"] == "1999"
    assert skips.counts == {"too_few_turns": 1}


def test_hh_pairs_and_chosen_conversations_from_gz(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    shared = "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water, yeast.\n\nHuman: How long?"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"chosen": shared + "\n\nAssistant: About 40 minutes at 220C.",
                                 "rejected": shared + "\n\nAssistant: Figure it out."}) + "\n")
    records, skips = load("hh", path=str(path))
    pair, chat = records
    assert check_preference(pair)["prompt"] == [
        {"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Flour, water, yeast."},
        {"role": "user", "content": "How long?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "About 40 minutes at 220C."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "Figure it out."}]
    assert chat["turns"] == pair["prompt"] + pair["chosen"] and chat["id"] == pair["id"] == f"hh:{path}:1"


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """Never reach the hub: offline flags, and a datasets cache inside the test's folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()
    return str(tmp_path / "hf_cache")


def test_hf_local_json_with_column_mappings(tmp_path, hf_offline):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"q": "What is DVC?", "a": "Data version control.", "msgs": [{"role": "user", "content": "Hi"},
                                                                   {"role": "assistant", "content": "Hello"}],
         "body": "A document."},
        {"q": "And git?", "a": "Code version control.", "msgs": [{"role": "user", "content": "Yo"},
                                                               {"role": "assistant", "content": "Hey"}],
         "body": "Another document."},
    ])
    common = {"dataset": "json", "data_files": str(path), "split": "train", "cache_dir": hf_offline}
    pairs, skips = load("hf", prompt_column="q", response_column="a", **common)
    assert contents(pairs[1]) == ["And git?", "Code version control."] and pairs[1]["id"] == "hf:train:1"
    chats, _ = load("hf", messages_column="msgs", max_rows=1, **common)
    assert len(chats) == 1 and chats[0]["turns"][1] == {"role": "assistant", "content": "Hello"}
    documents, _ = load("hf", text_column="body", **common)
    assert [d["text"] for d in documents] == ["A document.", "Another document."]
    assert not skips.total


def test_hf_alpaca_input_column_follows_the_instruction(tmp_path, hf_offline):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "Translate to French", "input": "cat", "output": "chat"},
                                {"instruction": "Name a colour", "input": "", "output": "Blue"}]), encoding="utf-8")
    records, skips = load("hf", dataset="json", data_files=str(path), split="train", cache_dir=hf_offline,
                          prompt_column="instruction", input_column="input", response_column="output")
    assert [contents(r) for r in records] == [["Translate to French\n\ncat", "chat"], ["Name a colour", "Blue"]]
    with pytest.raises(Exception, match="input_column"):
        load("hf", dataset="json", data_files=str(path), messages_column="m", input_column="input")


def test_real_hh_rlhf_corpus():
    path = corpus_path("hh-rlhf-harmless-base-test-part1.jsonl.gz")
    records, skips = load("hh", path=str(path))
    pairs = [r for r in records if "chosen" in r]
    chats = [r for r in records if "turns" in r]
    assert len(pairs) + skips.total == 1156 and len(pairs) == len(chats)
    assert len(pairs) > 1100
    for pair in pairs:
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
        assert not any("\n\nHuman:" in t["content"] for t in pair["prompt"] + pair["chosen"])


def test_real_tinyshakespeare_text():
    path = corpus_path("tinyshakespeare.txt")
    records, skips = load("text", path=str(path), max_chars=4000)
    assert not skips.total and 250 < len(records) < 400
    assert all(len(r["text"]) <= 4000 for r in records)
    assert records[0]["text"].startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    words = sum(len(r["text"].split()) for r in records)
    assert words == len(path.read_text(encoding="utf-8").split())  # every word kept


def random_reddit_dump(path: Path, seed: int = 0) -> Path:
    """Threads with deep and branching replies, deleted and low-score comments, a missing parent, and a
    top-level comment without link_id, shuffled across threads as a real monthly dump is."""
    import random

    rng = random.Random(seed)
    rows = []
    for thread in range(40):
        if rng.random() < 0.8:
            rows.append({"id": f"s{thread}", "title": f"Question {thread}?", "selftext": "", "subreddit": "test",
                         "score": rng.choice([-1, 1, 5])})
        names = [f"t3_s{thread}", "t1_gone"]  # t1_gone is in no file: its replies start chains
        for number in range(rng.randrange(1, 30)):
            comment = {"id": f"c{thread}_{number}", "parent_id": rng.choice(names), "link_id": f"t3_s{thread}",
                       "body": rng.choice(["Sure.", "No way", "[deleted]", "[removed]", f"Reply {number}"]),
                       "score": rng.randrange(-2, 9)}
            if comment["parent_id"].startswith("t3_") and rng.random() < 0.1:
                del comment["link_id"]  # top-level: the parent names its thread
            rows.append(comment)
            names.append(f"t1_{comment['id']}")
    rng.shuffle(rows)
    return write_jsonl(path, rows)


def random_tweets(path: Path, seed: int = 0, conversation_ids: bool = False) -> Path:
    """Reply trees in time order, some branching, one reply cycle and one duplicate line."""
    import random

    rng = random.Random(seed)
    rows, root_of = [], {}
    for number in range(1, 400):
        parent = rng.choice([None, None, *range(max(1, number - 20), number)])
        root_of[number] = root_of[parent] if parent else number
        row = {"id": number, "text": f"@x tweet {number}", "in_reply_to_status_id": parent}
        if conversation_ids:
            row["conversation_id"] = root_of[number]
        rows.append(row)
    rows += [{"id": 900, "text": "a", "in_reply_to_status_id": 901}, {"id": 901, "text": "b", "in_reply_to_status_id": 900},
             rows[5]]
    return write_jsonl(path, rows)


def random_posts_xml(path: Path, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    rows, questions = [], []
    for post_id in range(1, 300):
        if not questions or rng.random() < 0.3:
            questions.append(post_id)
            accepted = f' AcceptedAnswerId="{post_id + rng.randrange(1, 6)}"' if rng.random() < 0.5 else ""
            rows.append(f'<row Id="{post_id}" PostTypeId="1" Score="{rng.randrange(-1, 5)}" Title="Q{post_id}" '
                        f'Body="&lt;p&gt;Why {post_id}?&lt;/p&gt;"{accepted} />')
        else:
            rows.append(f'<row Id="{post_id}" PostTypeId="2" ParentId="{rng.choice(questions[-8:])}" '
                        f'Score="{rng.randrange(-1, 5)}" Body="&lt;p&gt;Because {post_id}.&lt;/p&gt;" />')
    path.write_text("<posts>\n" + "\n".join(rows) + "\n</posts>\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("source_type, make_input", [
    ("reddit", lambda tmp: random_reddit_dump(tmp / "RC.jsonl")),
    ("twitter", lambda tmp: random_tweets(tmp / "tweets.jsonl")),
    ("twitter", lambda tmp: random_tweets(tmp / "tweets.jsonl", conversation_ids=True)),
    ("stackexchange", lambda tmp: random_posts_xml(tmp / "Posts.xml")),
])
def test_out_of_core_build_equals_the_one_bucket_build(tmp_path, source_type, make_input):
    """Threads spread over buckets give exactly the conversations (and skips) of one build over everything."""
    path = str(make_input(tmp_path))
    whole, whole_skips = load(source_type, path=path, buckets=1)
    assert len(whole) > 10
    for buckets in (2, 7, 64):
        spread, spread_skips = load(source_type, path=path, buckets=buckets)
        assert sorted(map(json.dumps, spread)) == sorted(map(json.dumps, whole))
        assert spread_skips.counts == whole_skips.counts
        assert load(source_type, path=path, buckets=buckets)[0] == spread  # a deterministic order


def test_reddit_one_bucket_is_todays_order(tmp_path):
    """With one bucket, chains come in the order of their first comment in the files, as before buckets."""
    records, _ = load("reddit", path=str(random_reddit_dump(tmp_path / "RC.jsonl")), buckets=1)
    lines = {row["id"]: number for number, row in enumerate(map(json.loads, (tmp_path / "RC.jsonl").open()))}
    firsts = [lines[record["id"].removeprefix("reddit:")] for record in records]
    assert firsts == sorted(firsts)


def test_reply_roots_out_of_core_equal_the_in_memory_walk():
    """Pointer jumping in SQLite gives reply_roots' answer, also in and below reply cycles (where the walk
    met itself depends on the order tweets came in)."""
    import random

    from chatforge.sources.twitter import ReplyRoots, reply_roots

    rng = random.Random(0)
    for _ in range(20):
        count = rng.randrange(1, 300)
        ids = [str(number) for number in rng.sample(range(1000), count)]
        parents = {tweet_id: rng.choice([None, str(rng.randrange(1000)), *ids]) for tweet_id in ids}
        with ReplyRoots() as roots:
            for tweet_id, parent in parents.items():
                roots.add(tweet_id, parent)
            roots.add(ids[0], "ignored: a duplicate keeps its first parent")
            roots.resolve()
            assert {tweet_id: roots.root(tweet_id) for tweet_id in ids} == reply_roots(parents)
