"""preferences: synthetic pairs, imported pairs and human labels → validated, deduplicated, split by prompt."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from chatforge import preferences
from chatforge.conversation import alternate, check_preference, conversation
from chatforge.files import SkipLog, read_jsonl
from chatforge.params import from_dict
from chatforge.preferences import PreferencesConfig, prompt_key
from chatforge.stats import pair_accuracy

TOPICS = ["the weather", "your favorite food", "the history of Rome", "a good book", "learning Python",
          "the football match", "a trip to the mountains", "the new phone", "cooking pasta", "the night sky"]


def sample_conversations() -> list[dict]:
    conversations = []
    for i, topic in enumerate(TOPICS):
        conversations.append(conversation(f"test:{i}", "test", alternate([
            f"What do you think about {topic}?",
            f"I think {topic} is a wonderful thing to talk about, and I could say a lot more about it.",
            "Tell me more, please.",
            f"Well, people have always had strong opinions about {topic}, and so do I.",
        ])))
    # the same prompt with two real replies: neither may become the other's rejection
    conversations.append(conversation("test:hi1", "test", alternate(["Hi", "Hello there, nice to meet you."])))
    conversations.append(conversation("test:hi2", "test", alternate(["Hi", "Hey! How is your day going?"])))
    return conversations


def config(**overrides) -> PreferencesConfig:
    return from_dict(PreferencesConfig, {"val_fraction": 0.3, **overrides}, "preferences")


def build(conversations, cfg, imported=(), labels=()):
    synthetic, _ = preferences.synthetic_pairs(conversations, cfg.synthetic, cfg.seed)
    origins = {"imported": list(imported), "labels": list(labels), "synthetic": synthetic}
    return preferences.build({k: v for k, v in origins.items() if getattr(cfg, k).enabled}, cfg)


def all_pairs(built):
    return built.splits["train"] + built.splits["val"]


def test_synthetic_pairs_share_the_real_prompt_and_differ():
    conversations = sample_conversations()
    cfg = config(synthetic={"rejections_per_prompt": 4})
    pairs, prefix_count = preferences.synthetic_pairs(conversations, cfg.synthetic, cfg.seed)
    assert prefix_count == 2 * len(TOPICS) + 2
    real = {json.dumps(c["turns"][:i + 1]) for c in conversations for i in range(len(c["turns"]))}
    strategies = Counter(p["meta"]["strategy"] for p in pairs)
    assert set(strategies) == {"other_reply", "truncated", "shuffled", "repetition"}
    for pair in pairs:
        check_preference(pair)
        assert pair["prompt"][-1]["role"] == "user"
        assert json.dumps(pair["prompt"] + pair["chosen"]) in real  # chosen = the real reply to that very prompt
        assert pair["rejected"][0]["role"] == "assistant" and pair["rejected"] != pair["chosen"]
        assert pair["rejected"][0]["content"].strip()
    hi_rejections = {p["rejected"][0]["content"] for p in pairs if p["prompt"][-1]["content"] == "Hi"}
    assert not hi_rejections & {"Hello there, nice to meet you.", "Hey! How is your day going?"}


def test_strategy_weights_and_determinism():
    conversations = sample_conversations()
    only_shuffled = config(synthetic={"strategies": {"other_reply": 0, "truncated": 0, "shuffled": 1,
                                                     "repetition": 0}})
    pairs, _ = preferences.synthetic_pairs(conversations, only_shuffled.synthetic, 0)
    assert pairs and {p["meta"]["strategy"] for p in pairs} == {"shuffled"}
    for pair in pairs:  # same words, another order
        assert sorted(pair["rejected"][0]["content"].split()) == sorted(pair["chosen"][0]["content"].split())
    assert build(conversations, config()).splits == build(conversations, config()).splits
    assert build(conversations, config(seed=1)).splits != build(conversations, config()).splits


def test_no_prompt_in_both_splits():
    built = build(sample_conversations(), config(synthetic={"rejections_per_prompt": 3}))
    train = {prompt_key(p["prompt"]) for p in built.splits["train"]}
    val = {prompt_key(p["prompt"]) for p in built.splits["val"]}
    assert train and val and not train & val


def imported_pairs(tmp_path):
    good = {"id": "hh:1", "source": "hh", "prompt": [{"role": "user", "content": "How do I bake bread?"}],
            "chosen": [{"role": "assistant", "content": "Mix flour, water, yeast and salt, then bake."}],
            "rejected": [{"role": "assistant", "content": "No."}]}
    lines = [
        json.dumps(good),
        json.dumps({**good, "id": "hh:2"}),  # duplicate of hh:1 under another id
        json.dumps({**good, "id": "hh:3", "rejected": good["chosen"]}),  # chosen == rejected
        json.dumps({**good, "id": "hh:4", "prompt": good["prompt"] + good["chosen"]}),  # ends in assistant
        json.dumps({**good, "id": "hh:5", "rejected": [{"role": "assistant", "content": "  "}]}),  # empty
        "{not json",
    ]
    path = tmp_path / "preferences.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skips = SkipLog()
    return list(preferences.read_imported(path, skips)), skips


def test_invalid_and_duplicate_pairs_are_dropped_and_counted(tmp_path):
    imported, skips = imported_pairs(tmp_path)
    assert skips.counts == {"bad_json": 1}
    built = build([], config(synthetic={"enabled": False}), imported=imported)
    assert [p["id"] for p in all_pairs(built)] == ["hh:1"]
    assert all_pairs(built)[0]["meta"] == {"origin": "imported", "strategy": "hh"}
    assert built.report["dropped"]["duplicates"] == {"imported": 1}
    assert built.report["dropped"]["invalid"] == {"imported/chosen_equals_rejected": 1, "imported/empty_reply": 1,
                                                  "imported/prompt_not_ending_in_user": 1}


def test_origin_switches_and_weights(tmp_path):
    conversations = sample_conversations()
    imported, _ = imported_pairs(tmp_path)
    base = build(conversations, config(), imported=imported)
    assert base.report["pairs"]["train"]["by_origin"]["synthetic"] > 0

    off = build(conversations, config(synthetic={"enabled": False}), imported=imported)
    assert "synthetic" not in off.report["pairs"]["train"]["by_origin"] | off.report["pairs"]["val"]["by_origin"]

    doubled = build(conversations, config(synthetic={"weight": 2.0}), imported=imported)
    for split in ("train", "val"):
        counts, base_counts = doubled.report["pairs"][split]["by_origin"], base.report["pairs"][split]["by_origin"]
        factor = 2 if split == "train" else 1  # weights repeat training pairs; val is evaluated once each
        assert counts["synthetic"] == factor * base_counts["synthetic"]
        assert counts.get("imported") == base_counts.get("imported")
    assert len({p["id"] for p in doubled.splits["train"]}) == len(doubled.splits["train"])

    evaluated_only = build(conversations, config(synthetic={"weight": 0.0}), imported=imported)
    assert "synthetic" not in evaluated_only.report["pairs"]["train"]["by_origin"]
    assert evaluated_only.report["pairs"]["val"]["by_origin"]["synthetic"] == base.report["pairs"]["val"]["by_origin"]["synthetic"]

    half = build(conversations, config(synthetic={"weight": 0.5, "rejections_per_prompt": 4}))
    full = build(conversations, config(synthetic={"rejections_per_prompt": 4}))
    assert 0 < half.report["pairs"]["train"]["total"] < full.report["pairs"]["train"]["total"]


def test_oasst_pairs_are_their_own_origin_with_their_own_weight(tmp_path):
    """Pairs of the oasst source (meta.format oasst) flow through clean's preferences.jsonl beside hh's."""
    hh = {"id": "hh:1", "source": "hh", "prompt": [{"role": "user", "content": "How do I bake bread?"}],
          "chosen": [{"role": "assistant", "content": "Mix flour, water, yeast and salt, then bake."}],
          "rejected": [{"role": "assistant", "content": "No."}]}
    ranked = [{"id": f"oasst:a{i}>b{i}", "source": "oasst", "prompt": [{"role": "user", "content": f"Question {i}?"}],
               "chosen": [{"role": "assistant", "content": f"A careful answer to {i}."}],
               "rejected": [{"role": "assistant", "content": f"A worse answer to {i}."}],
               "meta": {"format": "oasst", "tree": f"p{i}", "language": "en", "chosen_rank": 0,
                        "rejected_rank": 1 + i % 2}} for i in range(40)]
    path = tmp_path / "preferences.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in [hh, *ranked]))
    pairs = list(preferences.read_imported(path, SkipLog()))
    assert pairs[0]["meta"] == {"origin": "imported", "strategy": "hh"}
    assert pairs[1]["meta"] == {"origin": "oasst", "strategy": "rank0>rank1"}
    assert {p["meta"]["strategy"] for p in pairs[1:]} == {"rank0>rank1", "rank0>rank2"}

    def built(**origins):
        cfg = config(synthetic={"enabled": False}, **origins)
        grouped = {origin: [p for p in pairs if p["meta"]["origin"] == origin]
                   for origin in preferences.IMPORTED_ORIGINS if getattr(cfg, origin).enabled}
        return preferences.build(grouped, cfg).report

    base, doubled = built(), built(oasst={"weight": 2.0})
    assert doubled["weights"] == {"imported": 1.0, "oasst": 2.0}
    assert doubled["pairs"]["train"]["by_origin"]["oasst"] == 2 * base["pairs"]["train"]["by_origin"]["oasst"]
    assert doubled["pairs"]["val"]["by_origin"] == base["pairs"]["val"]["by_origin"]
    assert "oasst" not in built(oasst={"enabled": False})["read"]

    accuracy = pair_accuracy(pairs, [p["meta"]["strategy"] != "rank0>rank1" for p in pairs])
    assert accuracy["accuracy_by_origin"] == {"imported": 1.0, "oasst": 0.5}
    assert accuracy["accuracy_by_strategy"]["oasst/rank0>rank1"] == 0.0


def test_labels_give_pairs_and_ties_give_none(tmp_path):
    prompt = [{"role": "user", "content": "Hi"}]
    a, b = [{"role": "assistant", "content": "Hello!"}], [{"role": "assistant", "content": "Go away."}]
    (tmp_path / "alice.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "label:alice:1:A>B", "source": "label", "prompt": prompt, "chosen": a, "rejected": b,
         "meta": {"item": "1", "judgement": "prefer", "mode": "pairwise"}},
        {"id": "label:alice:2", "source": "label", "prompt": prompt, "replies": [a, b],
         "meta": {"item": "2", "judgement": "tie", "mode": "pairwise"}},
        {"id": "label:alice:3", "source": "label", "prompt": prompt, "replies": [a, b],
         "meta": {"item": "3", "judgement": "skip", "mode": "ranking"}},
    ]) + "\n")
    (tmp_path / "README.md").write_text("not a label file")
    judgements, skips = Counter(), SkipLog()
    pairs = list(preferences.read_labels(tmp_path, skips, judgements))
    assert [p["id"] for p in pairs] == ["label:alice:1:A>B"]
    assert pairs[0]["meta"] == {"origin": "labels", "strategy": "pairwise"}
    assert judgements == {"prefer": 1, "tie": 1, "skip": 1} and skips.total == 0
    assert list(preferences.read_labels(tmp_path / "absent", skips, judgements)) == []


def test_older_web_labels_of_a_model_with_itself_or_an_empty_prompt_are_dropped_and_counted(tmp_path):
    """What `chatforge serve` wrote before it refused them (a schemathesis run left such files): a web A/B label of
    a model against itself is a counted skip, one with a blank prompt a counted invalid pair. A `chatforge label`
    pair of two samples of one model is that labeller's design and stays."""
    a, b = [{"role": "assistant", "content": "Hello!"}], [{"role": "assistant", "content": "Go away."}]

    def label(item, prompt, mode, chosen_model, rejected_model):
        return {"id": f"web-{item}", "source": "web", "prompt": [{"role": "user", "content": prompt}], "chosen": a,
                "rejected": b, "meta": {"judgement": "prefer", "mode": mode,
                                        "models": {"chosen": chosen_model, "rejected": rejected_model}}}

    (tmp_path / "0.jsonl").write_text("".join(json.dumps(record) + "\n" for record in [
        label(1, "Hi", "web", "sft", "sft"), label(2, " ", "web", "sft", "ppo"), label(3, "Hi", "web", "sft", "ppo"),
        label(4, "Hey", "pairwise", "models/sft", "models/sft")]))
    skips = SkipLog()
    pairs = list(preferences.read_labels(tmp_path, skips, Counter()))
    assert [p["id"] for p in pairs] == ["web-2", "web-3", "web-4"]
    assert skips.counts == {"label_web_same_model": 1} and skips.examples[0].startswith(f"{tmp_path / '0.jsonl'}:1")
    built = preferences.build({"labels": pairs}, config(synthetic={"enabled": False}))
    assert [p["id"] for p in all_pairs(built)] == ["web-3", "web-4"]
    assert built.report["dropped"]["invalid"] == {"labels/empty_prompt": 1}


def test_stage_writes_splits_and_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/clean").mkdir(parents=True)
    conversations = sample_conversations()
    for name, part in (("train", conversations[:8]), ("val", conversations[8:])):
        (tmp_path / f"data/clean/{name}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in part))
    imported_pairs(tmp_path / "data/clean")
    (tmp_path / "params.yaml").write_text("preferences:\n  val_fraction: 0.3\n  synthetic:\n    rejections_per_prompt: 2\n")
    from stages import preferences as stage

    stage.main()
    report = json.loads((tmp_path / "reports/preferences.json").read_text())
    train, val = read_jsonl("data/preferences/train.jsonl"), read_jsonl("data/preferences/val.jsonl")
    assert report["pairs"]["train"]["total"] == len(train) and report["pairs"]["val"]["total"] == len(val)
    assert report["read"]["prefixes"] == 2 * len(TOPICS) + 2
    assert set(report["pairs"]["train"]["by_origin"]) | set(report["pairs"]["val"]["by_origin"]) == {"imported", "synthetic"}
    assert report["skipped_lines"]["by_reason"] == {"bad_json": 1}
    for pair in train + val:
        check_preference(pair)


def test_sft_sample_needs_the_model_as_a_stage_dependency(tmp_path):
    dvc = tmp_path / "dvc.yaml"
    dvc.write_text("stages:\n  preferences:\n    cmd: python stages/preferences.py\n    deps: [data/clean/train.jsonl]\n")
    with pytest.raises(Exception, match="models/sft"):
        preferences.require_stage_dependency("preferences", "models/sft", "sft_sample > 0", dvc)
    dvc.write_text("stages:\n  preferences:\n    deps: [models/sft]\n")
    preferences.require_stage_dependency("preferences", "models/sft", "sft_sample > 0", dvc)


def test_sft_sample_strategy_uses_the_sampler():
    cfg = config(synthetic={"strategies": {"other_reply": 0, "truncated": 0, "shuffled": 0, "repetition": 0,
                                           "sft_sample": 1}})
    pairs, _ = preferences.synthetic_pairs(sample_conversations(), cfg.synthetic, 0,
                                           sft_sampler=lambda prompts: [f"sampled {len(p)}" for p in prompts])
    assert pairs and all(p["meta"]["strategy"] == "sft_sample" for p in pairs)
    assert {p["rejected"][0]["content"] for p in pairs} == {"sampled 1", "sampled 3"}


def test_bad_params_name_the_key():
    with pytest.raises(Exception, match="preferences.synthetic.strategies.shuffled"):
        config(synthetic={"strategies": {"shuffled": -1}})
    with pytest.raises(Exception, match="preferences.val_fraction"):
        config(val_fraction=1.5)
