"""`chatforge serve` against a live server on a free loopback port, with two tiny random models.

The official `openai` client talks to it unchanged; bad requests get OpenAI-style 4xx errors; concurrent
requests and concurrent A/B choices are safe.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from chatforge.errors import ChatforgeError
from chatforge.generation import SamplingParams
from chatforge.serving.app import create_app
from chatforge.serving.completions import StopMatcher
from chatforge.serving.local import background_server
from chatforge.serving.worker import ModelRegistry, ModelSpec, model_specs
from conftest import make_tiny_llama

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


def save_tiny_model(path, tokenizer, seed):
    make_tiny_llama(tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    """Base URL of a live server with models `a` and `b`; A/B records go to its `data_dir`."""
    root = tmp_path_factory.mktemp("serve")
    specs = [ModelSpec(name, save_tiny_model(root / name, tiny_tokenizer, seed)) for name, seed in (("a", 0), ("b", 1))]
    registry = ModelRegistry.load(specs, max_queue=64)
    app = create_app(registry, SamplingParams(max_new_tokens=16), data_dir=root / "data")
    with background_server(app) as url:
        yield {"url": url, "data_dir": root / "data", "tokenizer": tiny_tokenizer}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="x", max_retries=0, timeout=60)


def post(server, path, body, **kwargs):
    return httpx.post(f"{server['url']}{path}", json=body, timeout=60, **kwargs)


# ------------------------------------------------------------------------------------- OpenAI client


def test_openai_client_non_streaming_is_reproducible_with_seed(client, server):
    from chatforge.generation import prompt_ids

    first = client.chat.completions.create(model="a", messages=HELLO, max_tokens=8, seed=3, temperature=1.0)
    again = client.chat.completions.create(model="a", messages=HELLO, max_tokens=8, seed=3, temperature=1.0)
    choice = first.choices[0]
    assert first.object == "chat.completion" and first.model == "a"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens == len(prompt_ids(server["tokenizer"], HELLO))
    assert 1 <= first.usage.completion_tokens <= 8
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert again.choices[0].message.content == choice.message.content


def test_openai_client_streaming_matches_non_streaming(client):
    whole = client.chat.completions.create(model="b", messages=HELLO, max_tokens=12, seed=5, temperature=1.0)
    chunks = list(client.chat.completions.create(model="b", messages=HELLO, max_tokens=12, seed=5, temperature=1.0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed, piece by piece


def test_n_choices_and_length_finish(client):
    reply = client.chat.completions.create(model="a", messages=HELLO, max_tokens=1, n=3, seed=0, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens <= 3
    assert all(c.finish_reason == "length" or not c.message.content for c in reply.choices)


def test_stop_sequences_cut_the_reply_streaming_and_not(client):
    sample = dict(model="b", messages=HELLO, max_tokens=16, temperature=1.0, seed=5)
    full = client.chat.completions.create(**sample).choices[0].message.content
    assert len(full) > 6, "this seeded reply of the tiny model is long enough to cut"
    stop = full[3:5]
    cut = full[: full.index(stop)]
    reply = client.chat.completions.create(**sample, stop=[stop, "\x00"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**sample, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_matcher_holds_back_a_possible_stop_across_pieces():
    matcher = StopMatcher(["END"])
    assert matcher.push("hello E") == "hello "
    assert matcher.push("N") == ""
    assert matcher.push("D tail") == "" and matcher.stopped
    plain = StopMatcher(["xyz"])
    assert plain.push("abx") == "ab" and plain.push("q") == "xq" and plain.flush() == ""


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["a", "b"]
    health = httpx.get(f"{server['url']}/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"a", "b"}
    assert health["models"]["a"]["context_length"] == 128


def test_unknown_model_is_openai_404(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    response = post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": HELLO})
    assert response.status_code == 404
    assert response.json()["error"] == {"message": response.json()["error"]["message"], "type": "invalid_request_error",
                                        "param": "model", "code": "model_not_found"}


BAD_REQUESTS = {
    "invalid_json": b'{"messages": [{"role": "user", "content": "hi"}',
    "not_an_object": [1, 2],
    "missing_messages": {"model": "a"},
    "empty_messages": {"messages": []},
    "messages_not_a_list": {"messages": "hi"},
    "unknown_role": {"messages": [{"role": "bot", "content": "hi"}]},
    "content_not_a_string": {"messages": [{"role": "user", "content": 42}]},
    "content_missing": {"messages": [{"role": "user"}]},
    "last_turn_not_user": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    "temperature_too_high": {"messages": HELLO, "temperature": 2.5},
    "temperature_negative": {"messages": HELLO, "temperature": -0.1},
    "top_p_zero": {"messages": HELLO, "top_p": 0},
    "top_p_above_one": {"messages": HELLO, "top_p": 1.5},
    "max_tokens_zero": {"messages": HELLO, "max_tokens": 0},
    "max_tokens_above_context": {"messages": HELLO, "max_tokens": 1000},
    "prompt_plus_max_tokens_above_context": {"messages": HELLO, "max_tokens": 125},
    "prompt_longer_than_context": {"messages": [{"role": "user", "content": "hello there " * 200}]},
    "n_zero": {"messages": HELLO, "n": 0},
    "n_too_large": {"messages": HELLO, "n": 100},
    "stop_not_a_string": {"messages": HELLO, "stop": 3},
    "stop_too_many": {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]},
    "stop_empty_string": {"messages": HELLO, "stop": [""]},
    "stream_not_a_bool": {"messages": HELLO, "stream": "yes"},
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_style_400(server, case):
    body = BAD_REQUESTS[case]
    url = f"{server['url']}/v1/chat/completions"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        response = httpx.post(url, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if case.startswith(("prompt_", "max_tokens_above")):
        assert error["param"] in ("messages", "max_tokens") and "context" in error["message"]


# ---------------------------------------------------------------------------------------- concurrency


def test_concurrent_requests_all_succeed(server):
    def one(i):
        body = {"model": "ab"[i % 2], "messages": HELLO, "max_tokens": 6, "stream": i % 3 == 0}
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == 200
        return response.text.rstrip().endswith("data: [DONE]") if body["stream"] else bool(response.json()["choices"])

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(one, range(24)))
    health = httpx.get(f"{server['url']}/health").json()
    assert all(model["queued"] == 0 for model in health["models"].values())


def test_streaming_neither_blocks_the_server_nor_outlives_its_client(server):
    def runs_to_the_limit(seed):
        body = {"model": "b", "messages": HELLO, "max_tokens": 100, "temperature": 1.0, "seed": seed}
        choice = post(server, "/v1/chat/completions", body).json()["choices"][0]
        return choice["finish_reason"] == "length" and choice["message"]["content"]

    seed = next(seed for seed in range(20) if runs_to_the_limit(seed))  # a reply that would not end by itself
    body = {"model": "b", "messages": HELLO, "max_tokens": 100, "temperature": 1.0, "seed": seed}
    before = httpx.get(f"{server['url']}/health").json()["models"]["b"]["cancelled"]
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if '"content"' in line and '"content": ""' not in line)
        start = time.perf_counter()
        assert httpx.get(f"{server['url']}/health").status_code == 200  # the event loop is free meanwhile
        assert time.perf_counter() - start < 2
    deadline = time.monotonic() + 10  # the client left: the worker stops at its next token
    while httpx.get(f"{server['url']}/health").json()["models"]["b"]["cancelled"] == before:
        assert time.monotonic() < deadline, "generation went on after the client disconnected"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ A/B mode


def new_comparison(server, models):
    response = post(server, "/api/comparisons", {"messages": HELLO, "models": models, "max_tokens": 8,
                                                 "temperature": 1.0})
    assert response.status_code == 200, response.text
    return response.json()


def test_comparison_is_blinded_until_the_choice(server):
    item = new_comparison(server, ["a", "b"])
    assert set(item) == {"id", "replies"} and set(item["replies"]) == {"A", "B"}
    result = post(server, f"/api/comparisons/{item['id']}/choice", {"choice": "A", "annotator": "ann"}).json()
    assert sorted(result["key"].values()) == ["a", "b"] and result["winner"] == result["key"]["A"]
    again = post(server, f"/api/comparisons/{item['id']}/choice", {"choice": "B", "annotator": "ann"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "comparison_not_found"


@pytest.mark.parametrize("body", [{"choice": "C", "annotator": "ann"}, {"choice": "A", "annotator": "../etc/x"},
                                  {"choice": "A"}])
def test_bad_choices_are_400(server, body):
    item = new_comparison(server, ["a"])
    response = post(server, f"/api/comparisons/{item['id']}/choice", body)
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_concurrent_choices_append_whole_lines(server):
    ratings_path = server["data_dir"] / "human_ratings.jsonl"
    labels_dir = server["data_dir"] / "labels"
    ratings_before = len(ratings_path.read_text().splitlines()) if ratings_path.exists() else 0
    items = [new_comparison(server, ["a", "b"]) for _ in range(10)] + [new_comparison(server, ["a"]) for _ in range(4)]
    choices = ["A", "B", "tie"]
    barrier = threading.Barrier(len(items))

    def choose(index):
        barrier.wait()  # all at once
        body = {"choice": choices[index % 3], "annotator": f"ann{index % 2}"}
        return post(server, f"/api/comparisons/{items[index]['id']}/choice", body).json()

    with ThreadPoolExecutor(len(items)) as pool:
        results = list(pool.map(choose, range(len(items))))

    ratings = [json.loads(line) for line in ratings_path.read_text().splitlines()]
    web_ratings = ratings[ratings_before:]
    assert len(web_ratings) == 10  # two-model comparisons only; one model's two samples are no model rating
    ids = {item["id"] for item in items[:10]}
    for record in web_ratings:
        assert record["item"] in ids and record["origin"] == "web" and set(record["replies"]) == {"a", "b"}
        assert record["winner"] in ("a", "b", "tie") and record["annotator"] in ("ann0", "ann1")
        assert record["prompt"] == HELLO and record["time"]
    labels = [json.loads(line) for path in labels_dir.glob("*.jsonl") for line in path.read_text().splitlines()]
    expected_labels = {r["id"] for r in results if r["choice"] != "tie"} & {
        item["id"] for item in items if item["replies"]["A"] != item["replies"]["B"]}
    assert expected_labels <= {label["id"] for label in labels}
    for label in labels:
        assert label["source"] == "web" and label["prompt"] == HELLO and label["chosen"] != label["rejected"]
        assert label["chosen"][0]["role"] == "assistant" and label["meta"]["judgement"] == "prefer"
        assert label["meta"]["annotator"] in ("ann0", "ann1", "ann")


# --------------------------------------------------------------------------------------- model specs


def test_model_specs_from_arguments_and_defaults(tmp_path):
    assert model_specs(["sft=models/sft", "some/dir/ppo"]) == [ModelSpec("sft", Path("models/sft")),
                                                               ModelSpec("ppo", Path("some/dir/ppo"))]
    with pytest.raises(ChatforgeError, match="two models are named"):
        model_specs(["x=a", "x=b"])
    with pytest.raises(ChatforgeError, match="no model to serve"):
        model_specs(None, tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "sft").mkdir()
    assert [spec.name for spec in model_specs(None, tmp_path)] == ["sft", "base"]
