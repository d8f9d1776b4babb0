"""`chatforge chat` end to end, as a user runs it, on a tiny model this test overfits to a few chats."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatforge.cli import main
from chatforge.commands.chat import _pick_model
from chatforge.errors import ChatforgeError
from chatforge.inference.generate import generate_reply
from chatforge.inference.sampling import SamplingParams
from conftest import make_tiny_llama

CHATFORGE = str(Path(sys.executable).parent / "chatforge")
CHATS = [
    ("Hi", "Hello there"),
    ("What is your name?", "I am a tiny bot."),
    ("Tell me a joke", "Why did the chicken cross the road?"),
    ("Bye", "See you soon!"),
]
SYSTEM = {"role": "system", "content": "Be brief."}


def exchange(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_tokenizer):
    """Plain next-token training on the rendered chats (single-turn, multi-turn, with a system prompt)
    until the model replies by heart."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the CPU is shared
    model = make_tiny_llama(tiny_tokenizer, seed=0, hidden=32, layers=2)
    conversations = [exchange(q, a) for q, a in CHATS]
    conversations += [exchange(*CHATS[0]) + exchange(q, a) for q, a in CHATS[1:]]
    conversations += [[SYSTEM, *exchange(q, a)] for q, a in CHATS]
    rows = [tiny_tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tiny_tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = labels[i, : len(row)] = torch.tensor(row)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(100):
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    greedy = SamplingParams(temperature=0)
    for question, answer in CHATS:
        assert generate_reply(model, tiny_tokenizer, [{"role": "user", "content": question}], greedy).text == answer
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("chat_model")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def chat(*args: str, stdin: str = "", cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [CHATFORGE, "chat", *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_interactive_chat_with_scripted_stdin(chat_model_dir, tmp_path):
    script = [
        "Hi",  # sampled at the default temperature, but the model knows the reply by heart
        "/set temperature=0",
        "What is your name?",
        "/set top_p=7",
        "/help",
        "/reset",
        "",
        "Bye",
        "/set max_new_tokens=104",  # 128-token context - 104 leaves 24 prompt tokens: about one exchange
        "/reset",
        "Hi",
        "Tell me a joke",
        "/quit",
        "Hi",
    ]
    result = chat("--model", str(chat_model_dir), "--seed", "0", stdin="\n".join(script) + "\n", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    replies = [line.removeprefix("bot> ") for line in result.stdout.splitlines() if line.startswith("bot> ")]
    assert replies == [
        "Hello there",
        "I am a tiny bot.",
        "See you soon!",
        "Hello there",
        "Why did the chicken cross the road?",
    ]  # and nothing after /quit
    assert "settings: temperature=0.0, top_p=0.9" in result.stdout
    assert "top_p=7: must be in (0, 1]" in result.stderr
    assert "/reset" in result.stdout and "conversation reset" in result.stdout
    assert re.search(r"context full: forgot the \d+ oldest turns", result.stderr)
    assert "Traceback" not in result.stderr


def test_one_shot_prints_only_the_reply_and_picks_the_best_model(chat_model_dir, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sft").symlink_to(chat_model_dir)
    (tmp_path / "params.yaml").write_text("generate:\n  temperature: 0.0\n  max_new_tokens: 3\n")
    # params.yaml makes it greedy; the flag overrides its max_new_tokens
    result = chat("-p", "Tell me a joke", "--system", "Be brief.", "--max-new-tokens", "40", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Why did the chicken cross the road?\n"
    assert "model: models/sft" in result.stderr


def test_missing_model_is_one_line_and_exit_1(tmp_path, capsys):
    # in-process through the real entry point (a subprocess would only add torch's import time)
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--model", str(tmp_path / "models" / "ppo"), "-p", "Hi"])
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert "no such model directory; run `dvc repro sft`" in stderr


def test_no_trained_model_says_which_stage_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = r"no trained model in models/ppo, models/sft, models/base; run `dvc repro sft`"
    with pytest.raises(ChatforgeError, match=expected):
        _pick_model(None)
    assert _pick_model(Path("models/ppo")) == (Path("models/ppo"), "ppo")
