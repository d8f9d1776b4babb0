"""Continuous batching in `chatforge serve`: requests decoded together return what they return alone, a gone
client frees its rows, a full queue answers 429 with Retry-After, and the engine runs in its own process, whose
death fails requests instead of hanging them."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chatforge.errors import ChatforgeError
from chatforge.inference.sampling import SamplingParams
from chatforge.serving.app import create_app
from chatforge.serving.local import background_server
from chatforge.serving.worker import ModelRegistry, ModelSpec
from conftest import make_loud_llama


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# different prompt lengths and every per-request setting; each is sent alone, then all at once
REQUESTS = [
    {"messages": ask("What is your favorite food?"), "max_tokens": 24, "temperature": 0},
    {"messages": ask("Hi"), "max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 5},
    {"messages": ask("Can you tell me a joke about the weather in the park?"), "max_tokens": 9, "temperature": 0.8,
     "top_k": 10, "repetition_penalty": 1.3, "seed": 6},
    {"messages": [*ask("Hello!"), {"role": "assistant", "content": "I am fine."}, *ask("Why?")], "max_tokens": 30,
     "temperature": 1.2, "n": 3, "seed": 7},
    {"messages": ask("Let us go for a walk."), "max_tokens": 16, "temperature": 0, "stream": True},
    {"messages": ask("Computers run programs."), "max_tokens": 12, "temperature": 0.9, "seed": 8, "n": 2,
     "stream": True, "stop": ["zz"]},
]


def save_loud_model(path, tokenizer):
    make_loud_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_loud_model(tmp_path_factory.mktemp("loud") / "m", tiny_tokenizer)


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    registry = ModelRegistry.load([ModelSpec("m", model_dir)], max_batch=8, max_queue=16)
    app = create_app(registry, SamplingParams(max_new_tokens=16), data_dir=tmp_path_factory.mktemp("data"))
    with background_server(app) as url:
        yield url, registry.workers["m"].engine


def complete(url: str, body: dict) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice, streamed or not."""
    if not body.get("stream"):
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return [(c["message"]["content"], c["finish_reason"]) for c in response.json()["choices"]]
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
                    if choice["finish_reason"]:
                        finishes[choice["index"]] = choice["finish_reason"]
    return [(texts[index], finishes[index]) for index in sorted(texts)]


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()["models"]["m"]


def test_requests_return_the_same_replies_alone_and_batched(served):
    url, engine = served
    alone = [complete(url, body) for body in REQUESTS]
    steps_before = engine.steps
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(lambda body: complete(url, body), REQUESTS))
    assert together == alone  # greedy and seeded sampled requests alike
    assert len({text for choices in alone for text, _ in choices}) == sum(body.get("n", 1) for body in REQUESTS)
    tokens = sum(body["max_tokens"] * body.get("n", 1) for body in REQUESTS)
    assert engine.steps - steps_before < tokens / 2, "the requests were decoded together, not one after another"


LOGPROB_REQUESTS = [  # greedy; sampled with settings that reshape the distribution it draws from; n > 1, streamed
    {"messages": ask("What is your favorite food?"), "max_tokens": 12, "temperature": 0, "logprobs": True},
    {"messages": ask("Hi"), "max_tokens": 10, "temperature": 1.5, "top_k": 5, "repetition_penalty": 1.3, "seed": 4,
     "logprobs": True, "top_logprobs": 3},
    {"messages": ask("Can you tell me a joke?"), "max_tokens": 8, "temperature": 0.7, "top_p": 0.8, "seed": 9, "n": 2,
     "logprobs": True, "top_logprobs": 20, "stream": True},
]


def logprob_entries(url: str, body: dict) -> list[list[dict]]:
    """Each choice's `logprobs.content`, streamed (the chunks' entries in order) or not."""
    if not body.get("stream"):
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return [choice["logprobs"]["content"] for choice in response.json()["choices"]]
    entries: dict[int, list[dict]] = {index: [] for index in range(body.get("n", 1))}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    entries[choice["index"]] += (choice["logprobs"] or {}).get("content", [])
    return [entries[index] for index in sorted(entries)]


def test_logprobs_are_the_models_log_softmax_at_the_drawn_tokens_alone_and_batched(served, model_dir):
    """The raw model's distribution (before penalty, temperature, top-k, top-p), token by token, equal to a plain
    forward pass over the prompt and the reply, whether the request ran alone or batched with the others."""
    import torch

    from chatforge.inference.loading import load_model
    from chatforge.inference.prompting import prompt_ids
    from chatforge.tokenization import TokenBytes

    url, _ = served
    model, tokenizer = load_model(model_dir)
    token_bytes = TokenBytes(tokenizer)
    id_of = {token_bytes(token): token for token in range(len(tokenizer))}
    assert len(id_of) == len(tokenizer), "every token's bytes name it"

    alone = [logprob_entries(url, body) for body in LOGPROB_REQUESTS]
    with ThreadPoolExecutor(len(LOGPROB_REQUESTS)) as pool:
        together = list(pool.map(lambda body: logprob_entries(url, body), LOGPROB_REQUESTS))
    for body, choices_alone, choices_together in zip(LOGPROB_REQUESTS, alone, together):
        prompt = prompt_ids(tokenizer, body["messages"])
        for entries, entries_together in zip(choices_alone, choices_together):
            assert [e["token"] for e in entries] == [e["token"] for e in entries_together]
            reply = [id_of[bytes(entry["bytes"])] for entry in entries]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1].float()
            expected = torch.log_softmax(logits, dim=-1)
            for position, (entry, batched) in enumerate(zip(entries, entries_together)):
                row = expected[position]
                assert entry["logprob"] == pytest.approx(row[reply[position]].item(), abs=1e-4)
                assert batched["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)
                assert len(entry["top_logprobs"]) == body.get("top_logprobs", 0)
                best = row.topk(len(entry["top_logprobs"]))
                assert [top["logprob"] for top in entry["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-4)
                assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", errors="replace")


def test_no_logprobs_unless_asked(served):
    url, _ = served
    reply = httpx.post(f"{url}/v1/chat/completions", json={**REQUESTS[0], "logprobs": False}, timeout=60).json()
    assert reply["choices"][0]["logprobs"] is None


def test_a_client_that_leaves_frees_its_rows(served):
    url, _ = served
    before = health(url)["cancelled"]
    body = {"messages": ask("Hi"), "max_tokens": 100, "n": 8, "temperature": 1.0, "seed": 1}
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up waiting
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.05)
    deadline = time.monotonic() + 10
    while health(url)["cancelled"] == before or health(url)["active"]:
        assert time.monotonic() < deadline, "its rows went on decoding after the client left"
        time.sleep(0.02)


def test_a_full_queue_answers_429_with_retry_after(model_dir, tmp_path):
    registry = ModelRegistry.load([ModelSpec("m", model_dir)], max_batch=1, max_queue=8)
    app = create_app(registry, SamplingParams(max_new_tokens=16), data_dir=tmp_path)
    body = {"messages": ask("Hi"), "max_tokens": 100, "n": 8, "temperature": 1.0, "stream": True}
    with background_server(app) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream, which cancels the rows
            next(lines)  # one row decodes, seven wait
            second = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert second.status_code == 429
        assert int(second.headers["Retry-After"]) >= 1
        assert second.json()["error"]["code"] == "overloaded" and second.json()["error"]["type"] == "rate_limit_error"


def test_ignore_eos_generates_exactly_max_tokens(served):
    url, _ = served
    body = {"messages": ask("Hi"), "max_tokens": 20, "n": 2, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 40
    assert [choice["finish_reason"] for choice in reply["choices"]] == ["length", "length"]


def test_the_engine_runs_in_its_own_process_and_its_death_fails_requests(model_dir, tmp_path):
    registry = ModelRegistry.load([ModelSpec("m", model_dir)], max_batch=4, max_queue=8)
    engine = registry.workers["m"].engine
    assert engine.pid != os.getpid()
    app = create_app(registry, SamplingParams(max_new_tokens=16), data_dir=tmp_path)
    body = {"messages": ask("Hi"), "max_tokens": 100, "temperature": 1.0, "stream": True, "ignore_eos": True}
    with background_server(app) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # decoding has begun
            os.kill(engine.pid, 9)
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert rest[-1]["error"]["type"] == "server_error"  # the stream ends with an error, not a hang
        after = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        assert after.status_code == 503 and after.json()["error"]["code"] == "engine_unavailable"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_a_model_that_cannot_load_ends_the_start_and_closes_the_other_engines(model_dir, tmp_path):
    import multiprocessing

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    specs = [ModelSpec("a", model_dir), ModelSpec("broken", tmp_path / "broken"), ModelSpec("b", model_dir)]
    with pytest.raises(ChatforgeError, match="broken") as failure:
        ModelRegistry.load(specs, max_batch=2, max_queue=2)
    assert "\n" not in str(failure.value)  # one line, no traceback
    started = {"chatforge-engine-a", "chatforge-engine-b"}
    assert not [child for child in multiprocessing.active_children() if child.name in started]  # closed again
