"""Pretraining: model sizing, packing, schedule, bits per byte, the Kneser-Ney baseline, and a real
kill -9 / resume of the stage."""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from chatforge.errors import ChatforgeError
from chatforge.modeling import ModelConfig, build_model, count_parameters
from chatforge.stats import bits_per_byte
from chatforge.ngram import START, KneserNeyLM
from chatforge.params import from_dict
from chatforge.token_shards import TokenizeConfig, tokenize_corpus
from stage_projects import write_clean_splits
from chatforge.chat_windows import IGNORE_INDEX
from chatforge.lm_loss import evaluation_batches, pack
from chatforge.training.pretrain import (
    PackedWindows, PretrainConfig, compute_model, learning_rate_at, make_optimizer, optimizer_step,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- model sizing

def test_depth_dial_derives_width_heads_and_mlp():
    config = from_dict(ModelConfig, {"depth": 6}, "model")
    assert config.resolved_num_layers == 6
    assert config.resolved_hidden_size == 6 * 64
    assert config.resolved_num_heads == 6 * 64 // 64
    assert config.resolved_intermediate_size == 1024  # 8/3 * 384 = 1024, already a multiple of 64
    assert from_dict(ModelConfig, {"depth": 4}, "model").resolved_intermediate_size == 704  # 682.7 rounded up


def test_every_derived_size_can_be_overridden(tiny_tokenizer):
    config = from_dict(ModelConfig, {"depth": 8, "num_layers": 2, "hidden_size": 96, "num_heads": 3,
                                     "num_kv_heads": 1, "intermediate_size": 200, "context_length": 64}, "model")
    llama = config.to_llama_config(tiny_tokenizer)
    assert (llama.num_hidden_layers, llama.hidden_size, llama.num_attention_heads) == (2, 96, 3)
    assert (llama.num_key_value_heads, llama.intermediate_size, llama.head_dim) == (1, 200, 32)
    assert llama.max_position_embeddings == 64 and llama.vocab_size == len(tiny_tokenizer)
    assert llama.pad_token_id == tiny_tokenizer.pad_token_id != llama.eos_token_id


def test_inconsistent_sizes_are_one_clear_error():
    with pytest.raises(ChatforgeError, match="model.num_heads"):
        from_dict(ModelConfig, {"hidden_size": 100, "num_heads": 3}, "model")


def test_tied_embeddings_count_once(tiny_tokenizer):
    config = from_dict(ModelConfig, {"depth": 1, "aspect_ratio": 32, "head_dim": 16}, "model")
    model = build_model(config, tiny_tokenizer, seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model) == sum(p.numel() for p in set(model.parameters()))


def test_blocks_start_as_the_identity_and_their_projections_train(tiny_tokenizer):
    config = from_dict(ModelConfig, {"depth": 2, "aspect_ratio": 32, "head_dim": 16, "dropout": 0.0}, "model")
    model = build_model(config, tiny_tokenizer, seed=0)
    projections = [w for layer in model.model.layers for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]
    assert all(not w.any() for w in projections)
    inputs = torch.randint(4, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=inputs, output_hidden_states=True).hidden_states
    assert all(torch.equal(hidden[0], h) for h in hidden[1:-1])  # each block adds nothing yet
    model(input_ids=inputs, labels=inputs).loss.backward()
    assert all(w.grad.abs().sum() > 0 for w in projections)

    llama_init = from_dict(ModelConfig, {"depth": 2, "aspect_ratio": 32, "head_dim": 16,
                                         "zero_init_projections": False}, "model")
    assert build_model(llama_init, tiny_tokenizer, seed=0).model.layers[0].mlp.down_proj.weight.std() > 0.01


def test_eager_training_attention_matches_sdpa_and_the_saved_model_says_sdpa(tiny_tokenizer, tmp_path):
    from chatforge.runtime import training_attention

    assert training_attention(torch.device("cpu")) == "eager"
    assert training_attention(torch.device("cuda")) == "sdpa"
    assert training_attention(torch.device("cpu"), "sdpa") == "sdpa"
    config = from_dict(ModelConfig, {"depth": 1, "aspect_ratio": 32, "head_dim": 16, "dropout": 0.0}, "model")
    model = build_model(config, tiny_tokenizer, seed=0).eval()
    inputs = torch.randint(4, len(tiny_tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sdpa = model(input_ids=inputs).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=inputs).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-4, rtol=1e-4)
    model.set_attn_implementation("sdpa")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("_attn_implementation", saved.get("attn_implementation", "sdpa")) in ("sdpa", None)


def test_bf16_weights_train_fp32_masters_and_keep_the_bf16_copy_in_sync(tiny_tokenizer):
    from accelerate import Accelerator

    config = from_dict(ModelConfig, {"depth": 1, "aspect_ratio": 32, "head_dim": 16, "dropout": 0.0}, "model")
    model = build_model(config, tiny_tokenizer, seed=0)
    train = from_dict(PretrainConfig, {"learning_rate": 0.01, "weights": "bf16"}, "pretrain")
    optimizer = make_optimizer(model, train)
    accelerator = Accelerator(cpu=True)
    compute, master, dtype = compute_model(model, train, accelerator.device, torch.bfloat16)
    assert dtype is None  # no autocast: the compute model is bf16 itself
    assert {p.dtype for p in compute.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    compute, optimizer = accelerator.prepare(compute, optimizer)
    inputs = torch.randint(4, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    losses = [float(optimizer_step(accelerator, compute, optimizer, [(inputs, inputs.roll(-1, 1))], dtype, 1.0,
                                   master)) for _ in range(10)]
    assert losses[-1] < losses[0] - 0.5
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    for fp32, bf16 in zip(model.parameters(), compute.parameters()):
        assert torch.equal(bf16, fp32.detach().to(torch.bfloat16)) and bf16.grad is None

    fp32_config = from_dict(PretrainConfig, {"weights": "fp32"}, "pretrain")
    assert compute_model(model, fp32_config, accelerator.device, torch.bfloat16) == (model, None, torch.bfloat16)


# --------------------------------------------------------------------------------------------------- data

def test_packing_puts_eos_before_and_between_records():
    assert pack([[5, 6], [7], [8, 9, 10]], eos_id=2).tolist() == [2, 5, 6, 2, 7, 2, 8, 9, 10, 2]


def test_windows_are_stream_slices_and_each_epoch_covers_the_stream():
    stream = torch.arange(100)
    windows = PackedWindows(stream, length=8, seed=3)
    inputs, targets = windows.batch(range(0, 30))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert all(int(row[-1] - row[0]) == 7 for row in inputs)  # consecutive tokens of the stream
    first_epoch = sorted(windows.start(i) for i in range(12))  # 99 // 8 = 12 windows at offset 0
    assert first_epoch == list(range(0, 96, 8))
    again = PackedWindows(stream, length=8, seed=3).batch(range(0, 30))[0]
    assert torch.equal(inputs, again)  # the order is a pure function of (seed, position): resumable


@pytest.mark.parametrize("stride", [None, 1, 3, 5])
def test_evaluation_windows_predict_every_token_after_the_first_once(stride):
    stream = torch.arange(23)
    batches = list(evaluation_batches(stream, length=5, batch_size=2, stride=stride))
    targets = torch.cat([y.flatten() for _, y in batches])
    assert sorted(t for t in targets.tolist() if t != IGNORE_INDEX) == list(range(1, 23))
    for inputs, window_targets in batches:
        scored = window_targets != IGNORE_INDEX
        assert torch.equal(window_targets[scored], (inputs + 1)[scored])  # a target is the next stream token


def test_evaluation_windows_give_every_prediction_after_the_first_window_half_a_window_of_context():
    windows = [(x, y) for inputs, targets in evaluation_batches(torch.arange(100), length=8, batch_size=4)
               for x, y in zip(inputs, targets)]
    assert (windows[0][1] != IGNORE_INDEX).all()
    for inputs, targets in windows[1:]:
        positions = torch.nonzero(targets != IGNORE_INDEX).flatten()
        assert positions.min() + 1 >= 8 - 4  # the target at index i is predicted from i + 1 tokens


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = PretrainConfig(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    rates = [learning_rate_at(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(rates[:10], rates[1:10]))
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(0.1)


def test_bits_per_byte_is_nats_over_ln2_over_bytes():
    assert bits_per_byte(8 * math.log(2) * 100, 100) == pytest.approx(8.0)
    assert bits_per_byte(math.log(2) * 50, 200) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------- n-gram baseline

def test_kneser_ney_matches_nltk_and_normalizes():
    from nltk.lm.models import InterpolatedLanguageModel
    from nltk.lm.smoothing import KneserNey
    from nltk.util import everygrams

    rng = random.Random(0)
    records = [[rng.choice([5, 6, 7, 8, 9]) for _ in range(rng.randint(1, 8))] for _ in range(30)]
    vocab = 12

    class UniformFloor(KneserNey):
        """nltk's KN with our lowest order: continuation unigram interpolated with the uniform."""

        def unigram_score(self, word):
            count, total = self._continuation_counts(word)
            types = len({w for _, counts in self.counts[2].items() for w in counts if counts[w] > 0})
            return max(count - self.discount, 0) / total + self.discount * types / total / vocab

    for order in (2, 3, 4):
        ours = KneserNeyLM(order, vocab, end_id=2, discount=0.75).fit(records)
        reference = InterpolatedLanguageModel(UniformFloor, order, params={"discount": 0.75, "order": order})
        padded = [[str(t) for t in ours.padded(r)] for r in records]
        reference.fit([list(everygrams(p, max_len=order)) for p in padded],
                      vocabulary_text=[str(t) for t in [*range(vocab), START]])
        for context in [(), (5,), (START,), (5, 6), (START, START), (9, 9, 9), (1, 1)]:
            short = tuple(str(c) for c in context[max(0, len(context) - order + 1):])
            for word in range(2, vocab):
                assert ours.probability(word, context) == pytest.approx(reference.unmasked_score(str(word), short or None))
        assert sum(ours.probability(w, (5, 6)) for w in range(vocab)) == pytest.approx(1.0, abs=0.01)


def test_kneser_ney_beats_a_unigram_model_on_repetitive_text():
    train = [[5, 6, 7, 8, 9] * 4 for _ in range(20)]
    held_out = [[5, 6, 7, 8, 9] * 3]
    trigram = KneserNeyLM(3, vocab_size=12, end_id=2).fit(train)
    nats, count = trigram.record_nats(held_out[0])
    assert count == 16
    unigram_nats = count * math.log(5)  # uniform over the five symbols, the best unigram here
    assert nats < 0.2 * unigram_nats


# ------------------------------------------------------------------------------------------------ resume

def test_a_checkpoint_from_other_params_or_data_is_not_resumed_and_the_log_names_them(tmp_path, capsys):
    from chatforge.training.checkpoints import Checkpoints

    def checkpoints(depth: int, max_steps: int, tokens: str) -> Checkpoints:
        return Checkpoints(tmp_path, "pretrain", {
            "params": {"model": {"depth": depth}, "pretrain": {"max_steps": max_steps, "seed": 0}},
            "inputs": {"tokens": tokens}}, section="")

    old = checkpoints(1, 40, "abc")
    old.commit(old.staging(10), 10, {"train_seconds": 1.0})
    assert checkpoints(1, 40, "abc").resumable() == tmp_path / "step_000010"
    assert checkpoints(2, 40, "xyz").resumable() is None
    log = " ".join(capsys.readouterr().err.split())
    assert "it was made with other params or inputs (model.depth 1 → 2; tokens changed); starting from step 0" in log
    assert not list(tmp_path.iterdir())  # the stale checkpoint is gone


def make_project(root: Path, tokenizer) -> None:
    clean = write_clean_splits(root, train=60, val=6)
    tokenizer.save_pretrained(root / "models" / "tokenizer")
    tokenize_corpus(tokenizer, root / "models" / "tokenizer" / "tokenizer.json", root / "data" / "tokens",
                    TokenizeConfig(tokens_per_shard=500), clean_dir=clean)  # the tokenize stage, several parts
    (root / "params.yaml").write_text(yaml.safe_dump({
        "model": {"depth": 1, "aspect_ratio": 32, "head_dim": 16, "context_length": 32},
        "pretrain": {"batch_size": 4, "max_steps": 40, "warmup_steps": 5, "eval_steps": 1000,
                     "checkpoint_every": 5, "threads": 1, "ngram_order": 3},
    }))


def run_stage(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"}
    return subprocess.Popen([sys.executable, str(REPO / "stages" / "pretrain.py")], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # two pretrain stage processes, one killed, and an uninterrupted one
def test_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path_factory, tiny_tokenizer):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stage_projects import saved_tensors

    tmp_path, uninterrupted = tmp_path_factory.mktemp("killed"), tmp_path_factory.mktemp("uninterrupted")
    make_project(tmp_path, tiny_tokenizer)
    shutil.copytree(tmp_path, uninterrupted, dirs_exist_ok=True)
    checkpoints = tmp_path / "models" / "base_checkpoint"
    first = run_stage(tmp_path)
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("step_*")):
        assert first.poll() is None, f"the run ended before its first checkpoint:\n{first.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "models" / "base").exists()

    second = run_stage(tmp_path)
    output = second.communicate(timeout=240)[0]
    assert second.returncode == 0, output
    resumed = re.search(r"resuming from \S+ at step (\d+)", " ".join(output.split()))
    assert resumed and int(resumed.group(1)) > 0, output

    report = json.loads((tmp_path / "reports" / "pretrain.json").read_text())
    assert report["resumed_from_step"] == int(resumed.group(1))
    assert math.isfinite(report["val_bits_per_byte"]) and math.isfinite(report["ngram_val_bits_per_byte"])
    assert [p.name for p in checkpoints.iterdir()] == ["complete.json"]  # a finished run leaves nothing to resume

    third = run_stage(uninterrupted)
    third_output = third.communicate(timeout=240)[0]
    assert third.returncode == 0, third_output
    resumed_model, reference = saved_tensors(tmp_path / "models/base"), saved_tensors(uninterrupted / "models/base")
    assert resumed_model.keys() == reference.keys()
    assert all(torch.equal(resumed_model[name], reference[name]) for name in reference)  # bit for bit on CPU
    uninterrupted_report = json.loads((uninterrupted / "reports/pretrain.json").read_text())
    assert uninterrupted_report["resumed_from_step"] == 0
    assert uninterrupted_report["val_loss"] == report["val_loss"]
    curve = "reports/live/pretrain/plots/metrics/train/loss.tsv"  # each step once: the killed run's extra rows went
    assert (tmp_path / curve).read_text() == (uninterrupted / curve).read_text()

    base = tmp_path / "models" / "base"
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    prompt = tokenizer("Hello!", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
