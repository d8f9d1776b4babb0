"""Tiny project folders for running the sft, reward, dpo and ppo stages (in process or as a subprocess to kill)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from conftest import TINY_TEXTS, make_tiny_llama

from chatforge.conversation import alternate, conversation, preference
from chatforge.files import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def write_params(root: Path, section: str, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({section: params}))


def save_causal_lm(path: Path, tokenizer, hidden: int = 32, context: int = 128) -> None:
    make_tiny_llama(tokenizer, hidden=hidden, context=context).save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_conversations(root: Path, count: int = 48, val: int = 8) -> None:
    pairs = list(zip(TINY_TEXTS[:6], TINY_TEXTS[1:7]))
    records = [conversation(f"c{i}", "t", alternate([*pairs[i % 6], *pairs[(i + 1) % 6]])) for i in range(count)]
    write_jsonl(root / "data/clean/train.jsonl", records[:count - val])
    write_jsonl(root / "data/clean/val.jsonl", records[count - val:])


def write_clean_splits(root: Path, train: int, val: int) -> Path:
    """data/clean train/val files of two-turn conversations (and empty documents files); returns the folder."""
    clean = root / "data" / "clean"
    lines = ["Hello! How are you today?", "I am fine, thank you. And you?", "What is your favorite food?",
             "I like pizza and pasta.", "The weather is nice, let us go for a walk."]
    for split, count in (("train", train), ("val", val)):
        write_jsonl(clean / f"{split}.jsonl", [
            conversation(f"{split}:{i}", "t", alternate([lines[i % 5], lines[(i + 1) % 5]])) for i in range(count)])
        write_jsonl(clean / f"documents_{split}.jsonl", [])
    return clean


def sft_project(root: Path, tokenizer, **params) -> None:
    save_causal_lm(root / "models/base", tokenizer, hidden=48, context=64)
    write_conversations(root)
    write_params(root, "sft", {"max_steps": 30, "learning_rate": 0.005, "batch_size": 8, "eval_steps": 10,
                               "logging_steps": 5, "precision": "fp32", "threads": 1, **params})


def preference_pairs(count: int, offset: int = 0) -> list[dict]:
    """Chosen: a fluent sentence; rejected: its first word repeated."""
    pairs = []
    for i in range(count):
        good = TINY_TEXTS[(i + offset) % 6]
        pairs.append(preference(f"p{offset}:{i}", "synthetic", [{"role": "user", "content": TINY_TEXTS[(i + 3) % 6]}],
                                [{"role": "assistant", "content": good}],
                                [{"role": "assistant", "content": " ".join([good.split()[0]] * 6)}],
                                meta={"origin": "synthetic", "strategy": "repetition"}))
    return pairs


def reward_project(root: Path, tokenizer, **params) -> None:
    save_causal_lm(root / "models/sft", tokenizer)
    write_jsonl(root / "data/preferences/train.jsonl", preference_pairs(24))
    write_jsonl(root / "data/preferences/val.jsonl", preference_pairs(6, offset=1))
    write_params(root, "reward", {"epochs": 3, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0,
                                  "logging_steps": 2, "eval_steps": 6, "max_length": 64, "precision": "fp32",
                                  "threads": 1, **params})


def dpo_project(root: Path, tokenizer, **params) -> None:
    save_causal_lm(root / "models/sft", tokenizer)
    write_jsonl(root / "data/preferences/train.jsonl", preference_pairs(24))
    write_jsonl(root / "data/preferences/val.jsonl", preference_pairs(6, offset=1))
    write_conversations(root)
    write_params(root, "dpo", {"epochs": 2, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0.0,
                               "logging_steps": 2, "eval_steps": 6, "eval_batch_size": 4, "max_prompt_tokens": 40,
                               "heldout_prompts": 4, "max_new_tokens": 6, "precision": "fp32", "threads": 1,
                               **params})


def ppo_project(root: Path, tokenizer, **params) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    save_causal_lm(root / "models/sft", tokenizer)
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(root / "models/reward")
    tokenizer.save_pretrained(root / "models/reward")
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "reports/reward.json").write_text(json.dumps({"chosen_score_mean": 0.0, "chosen_score_std": 1.0}))
    write_conversations(root)
    write_params(root, "ppo", {"steps": 6, "batch_size": 4, "minibatch_size": 2, "ppo_epochs": 2,
                               "max_new_tokens": 6, "max_prompt_tokens": 40, "learning_rate": 1e-3,
                               "heldout_prompts": 4, "eval_batch_size": 4, "precision": "fp32", "threads": 1,
                               **params})


def start_stage(stage: str, root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"}
    return subprocess.Popen([sys.executable, str(REPO / "stages" / f"{stage}.py")], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_stage(stage: str, root: Path) -> str:
    process = start_stage(stage, root)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    return " ".join(output.split())


def kill_at_first_checkpoint(stage: str, root: Path) -> None:
    """Start the stage, SIGKILL it as soon as a checkpoint exists (a real kill -9: no cleanup runs)."""
    checkpoints = root / "models" / f"{stage}_checkpoint"
    process = start_stage(stage, root)
    deadline = time.monotonic() + 240
    while not any(checkpoints.glob("step_*")):
        assert process.poll() is None, f"the run ended before its first checkpoint:\n{process.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def saved_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
