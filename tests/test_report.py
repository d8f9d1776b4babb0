import json

from chatforge.report import build


def test_report_renders_with_sections_missing(tmp_path):
    (tmp_path / "pretrain.json").write_text(json.dumps({"val_loss": 2.5, "wall_seconds": 100.0}))
    live = tmp_path / "live" / "pretrain" / "plots" / "metrics"
    live.mkdir(parents=True)
    (live / "train_loss.tsv").write_text("step\ttrain_loss\n0\t5.0\n1\t4.0\n")
    markdown = build(tmp_path)
    assert "# chatforge report card" in markdown
    assert "val_loss | 2.5" in markdown
    assert (tmp_path / "figures" / "pretrain.png").read_bytes()[:4] == b"\x89PNG"
    assert "figures/pretrain.png" in markdown
    # everything else is missing and says which stage to run, without failing
    for stage in ("collect", "clean", "tokenizer", "sft", "reward", "ppo", "dpo", "evaluate", "human_eval"):
        assert f"`dvc repro {stage}`" in markdown
    assert "## Environment" in markdown and "transformers" in markdown


def test_report_shows_eval_table_and_no_invented_human_numbers(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "sft.json").write_text(json.dumps({
        "all_tokens": {"perplexity": 12.0, "bits_per_byte": 1.1}, "ngram": {"bits_per_byte": 1.5},
        "replies": {"reward_mean": 0.3, "kl_to_sft": 0.0}, "wall_seconds": 5.0}))
    (tmp_path / "eval" / "dpo.json").write_text(json.dumps({"replies": {"reward_mean": 0.5, "kl_to_sft": 1.25}}))
    (tmp_path / "human_eval").mkdir()
    (tmp_path / "human_eval" / "results.json").write_text(json.dumps({
        "pair": ["sft", "ppo"], "n": 0, "ties": 0, "annotators": 0,
        "models": {m: {"wins": 0, "win_rate": None, "ci95": None} for m in ("sft", "ppo")},
        "reward_model": {"items": 3, "wins": {"sft": 1, "ppo": 2}, "win_rate": {"sft": 1 / 3, "ppo": 2 / 3}}}))
    markdown = build(tmp_path)
    assert "| sft | 12 | 1.1 | 1.5 |" in markdown
    assert "No ratings yet" in markdown and "| ppo | 0 | n/a | n/a | 0.6667 |" in markdown
    assert "| evaluate@sft | 5 |" in markdown and "| evaluate@dpo | n/a |" in markdown
    dpo_row = next(line for line in markdown.splitlines() if line.startswith("| dpo |"))
    assert dpo_row.endswith("| 0.5 | missing | missing | missing | missing | 1.25 |")
