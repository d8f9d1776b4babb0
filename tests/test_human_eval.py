import json
import subprocess
import sys

import pytest

from chatforge.stats import bits_per_byte, distinct_n, wilson_interval
from chatforge.human_eval import build_items, rating, render_sheet, summarize


def test_wilson_interval_matches_published_values():
    # 8 of 10 and 0 of 10 at 95%: values from Wilson (1927) as tabulated by Newcombe (1998).
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_distinct_n_and_bits_per_byte():
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n([""], 2) == 0.0
    # ln(2) nats over 1 byte is exactly one bit per byte
    assert bits_per_byte(0.6931471805599453 * 10, 10) == pytest.approx(1.0)


def samples(model, n):
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
             "reply": f"answer {i} in style {len(model)}{model == 'sft'}", "score": (1.0 if model == "ppo" else 0.0)} for i in range(n)]


@pytest.fixture
def items():
    return build_items({"sft": samples("sft", 12), "ppo": samples("ppo", 12)}, "sft", "ppo", 10, seed=0)


def test_items_are_randomized_and_sheet_hides_the_key(items):
    assert len(items) == 10
    sides = {item["key"]["A"] for item in items}
    assert sides == {"sft", "ppo"}  # the order is randomized per item, not fixed
    page = render_sheet(items, "which reply is better?")
    assert "<html" in page and "Item 10" in page
    assert "sft" not in page and "ppo" not in page  # neither model name nor the key is in the page
    assert "answer 3" in page


def test_summary_with_no_ratings_invents_nothing(items):
    results = summarize([], "sft", "ppo", items)
    assert results["n"] == 0
    assert results["models"]["ppo"]["win_rate"] is None and results["models"]["ppo"]["ci95"] is None
    assert results["reward_model"]["win_rate"]["ppo"] == 1.0


def test_summary_counts_wins_ties_and_annotators(items):
    ratings = []
    for annotator in ("ann", "bob"):
        for item in items[:5]:
            side = "A" if item["key"]["A"] == "ppo" else "B"
            ratings.append(rating(item, side, annotator, "test"))
    ratings.append(rating(items[5], "tie", "ann", "test"))
    results = summarize(ratings, "sft", "ppo", items)
    assert results["n"] == 11 and results["ties"] == 1 and results["annotators"] == 2
    assert results["models"]["ppo"]["wins"] == 10 and results["models"]["ppo"]["win_rate"] == 1.0
    assert results["models"]["ppo"]["ci95"] == pytest.approx(list(wilson_interval(10, 10)))


def test_rate_command_records_and_resumes(tmp_path, items):
    items_path, ratings_path = tmp_path / "items.jsonl", tmp_path / "ratings.jsonl"
    items_path.write_text("".join(json.dumps(i) + "\n" for i in items))
    command = [sys.executable, "-m", "chatforge.cli", "rate", "--annotator", "ann",
               "--items", str(items_path), "--ratings", str(ratings_path)]
    first = subprocess.run(command, input="a\nnonsense\nb\nt\ns\nq\n", text=True, capture_output=True, timeout=60)
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in ratings_path.read_text().splitlines()]
    assert len(records) == 3
    assert records[0]["winner"] == items[0]["key"]["A"] and records[1]["winner"] == items[1]["key"]["B"]
    assert records[2]["winner"] == "tie" and all(r["annotator"] == "ann" for r in records)
    assert "is not one of" in first.stderr
    second = subprocess.run(command, input="", text=True, capture_output=True, timeout=60)
    assert "7 of 10 items left" in second.stderr  # the three rated items are not shown again


def test_rate_without_items_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "chatforge.cli", "rate", "--annotator", "x",
                             "--items", str(tmp_path / "none.jsonl")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "run `dvc repro human_eval` first" in result.stderr and "Traceback" not in result.stderr


def test_fixed_sample_is_the_same_records_whatever_their_order():
    from chatforge.corpus import fixed_sample

    records = [{"id": f"c:{i}"} for i in range(50)]
    sample = fixed_sample(records, 10)
    assert len(sample) == 10 and sample == [r for r in records if r in sample]  # kept in file order
    assert sorted(map(str, fixed_sample(records[::-1], 10))) == sorted(map(str, sample))
    assert fixed_sample(records, None) is records and fixed_sample(records, 80) is records


def test_any_two_evaluated_models_by_params():
    from chatforge.human_eval import HumanEvalConfig
    from chatforge.params import from_dict

    config = from_dict(HumanEvalConfig, {"model_a": "ppo", "model_b": "dpo"}, "human_eval")
    items = build_items({"ppo": samples("ppo", 4), "dpo": samples("dpo", 4)}, config.model_a, config.model_b, 4, 0)
    assert {frozenset(item["key"].values()) for item in items} == {frozenset({"ppo", "dpo"})}
    with pytest.raises(Exception, match="human_eval.model_b ='rlhf': must be an evaluated model"):
        from_dict(HumanEvalConfig, {"model_b": "rlhf"}, "human_eval")
