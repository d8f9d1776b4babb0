"""`chatforge serve` against a live server on a free loopback port, with two tiny random models, an API key and
feedback collection on.

The official `openai` client talks to it unchanged with the key, and every route answers 401 without it; bad
requests and OpenAI parameters the server does not implement get OpenAI-style 400s naming them; a conversation
that ends with the assistant's message is continued; concurrent requests and concurrent A/B choices are safe.
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
from chatforge.inference.sampling import SamplingParams
from chatforge.serving.app import create_app
from chatforge.serving.completions import StopMatcher
from chatforge.serving.feedback import Comparisons, EmptyReply
from chatforge.serving.schemas import NOT_IMPLEMENTED
from chatforge.serving.local import background_server
from chatforge.serving.worker import ModelRegistry, ModelSpec, model_specs
from conftest import make_tiny_llama

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
KEY = "test-key-0123"


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
    app = create_app(registry, SamplingParams(max_new_tokens=16), data_dir=root / "data", api_key=KEY,
                     collect_feedback=True)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60,
                                                      headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield {"url": url, "data_dir": root / "data", "tokenizer": tiny_tokenizer, "http": http, "root": root}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, **kwargs):
    return server["http"].post(path, json=body, **kwargs)


# ------------------------------------------------------------------------------------- OpenAI client


def test_openai_client_non_streaming_is_reproducible_with_seed(client, server):
    from chatforge.inference.prompting import prompt_ids

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
    health = server["http"].get("/health").json()
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
    "unknown_field": {"messages": HELLO, "guided_json": {}},
    "message_name": {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
    "temperature_too_high": {"messages": HELLO, "temperature": 2.5},
    "temperature_negative": {"messages": HELLO, "temperature": -0.1},
    "top_p_zero": {"messages": HELLO, "top_p": 0},
    "top_p_above_one": {"messages": HELLO, "top_p": 1.5},
    "max_tokens_zero": {"messages": HELLO, "max_tokens": 0},
    "max_tokens_above_context": {"messages": HELLO, "max_tokens": 1000},
    "prompt_longer_than_context": {"messages": [{"role": "user", "content": "hello there " * 200}]},
    "n_zero": {"messages": HELLO, "n": 0},
    "n_too_large": {"messages": HELLO, "n": 100},
    "stop_not_a_string": {"messages": HELLO, "stop": 3},
    "stop_too_many": {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]},
    "stop_empty_string": {"messages": HELLO, "stop": [""]},
    "stream_not_a_bool": {"messages": HELLO, "stream": "yes"},
    "top_logprobs_without_logprobs": {"messages": HELLO, "top_logprobs": 2},
    "top_logprobs_above_20": {"messages": HELLO, "logprobs": True, "top_logprobs": 21},
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_style_400(server, case):
    body = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        response = server["http"].post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if case == "prompt_longer_than_context":
        assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    if case in ("unknown_field", "message_name"):
        assert error["code"] == "unknown_parameter" and error["param"] in ("guided_json", "messages.0.name")


# every OpenAI parameter the server does not implement, with a value that asks for it
REFUSED = {
    "frequency_penalty": 0.5, "presence_penalty": -1.0, "logit_bias": {"42": 5},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
    "parallel_tool_calls": False, "functions": [{"name": "f", "parameters": {}}], "function_call": "auto",
    "response_format": {"type": "json_object"}, "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low",
    "verbosity": "low", "web_search_options": {}, "store": True, "metadata": {"k": "v"}, "service_tier": "flex",
}
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "tools": [], "tool_choice": "none",
           "functions": [], "function_call": "none", "response_format": {"type": "text"}, "modalities": ["text"],
           "store": False, "metadata": {}, "service_tier": "auto", "user": "u-1", "safety_identifier": "s",
           "prompt_cache_key": "k", "parallel_tool_calls": None}


def test_refused_parameters_cover_every_not_implemented_one():
    assert set(REFUSED) == set(NOT_IMPLEMENTED)


@pytest.mark.parametrize("name", list(REFUSED))
def test_each_unimplemented_openai_parameter_is_a_400_naming_it(server, client, name):
    response = post(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, name: REFUSED[name]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and error["code"] == "unsupported_parameter" and repr(name) in error["message"]
    with pytest.raises(openai.BadRequestError, match=name):  # the official client raises it too
        client.chat.completions.create(model="a", messages=HELLO, max_tokens=2, extra_body={name: REFUSED[name]})


def test_the_values_that_ask_for_nothing_are_accepted(server):
    response = post(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, **NEUTRAL})
    assert response.status_code == 200, response.text


def test_max_tokens_past_the_context_ends_the_reply_at_the_context(server):
    """max_tokens is an upper bound: the reply stops where the model's context does (finish_reason length)."""
    body = {"model": "b", "messages": HELLO, "max_tokens": 125, "ignore_eos": True}
    reply = post(server, "/v1/chat/completions", body).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["total_tokens"] == 128  # the tiny models' context


def test_a_conversation_ending_with_the_assistant_is_continued(server, client):
    """Assistant prefill: the template leaves the last turn open and the reply is its continuation only, as the
    model continues those very tokens."""
    from chatforge.inference.generate import generate_from_ids
    from chatforge.inference.loading import load_model
    from chatforge.inference.prompting import prompt_ids

    model, tokenizer = load_model(server["root"] / "a")
    started = [*HELLO, {"role": "assistant", "content": "I am"}]
    prompt = prompt_ids(tokenizer, started)
    assert tokenizer.decode(prompt).endswith("<|assistant|>I am")
    expected = generate_from_ids(model, tokenizer, [prompt], SamplingParams(temperature=0, max_new_tokens=6))[0]
    reply = client.chat.completions.create(model="a", messages=started, max_tokens=6, temperature=0)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.choices[0].message.content == expected.text


# ---------------------------------------------------------------------------------------- concurrency


def test_concurrent_requests_all_succeed(server):
    def one(i):
        body = {"model": "ab"[i % 2], "messages": HELLO, "max_tokens": 6, "stream": i % 3 == 0}
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == 200
        return response.text.rstrip().endswith("data: [DONE]") if body["stream"] else bool(response.json()["choices"])

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(one, range(24)))
    health = server["http"].get("/health").json()
    assert all(model["queued"] == 0 for model in health["models"].values())


def test_streaming_neither_blocks_the_server_nor_outlives_its_client(server):
    def runs_to_the_limit(seed):
        body = {"model": "b", "messages": HELLO, "max_tokens": 100, "temperature": 1.0, "seed": seed}
        choice = post(server, "/v1/chat/completions", body).json()["choices"][0]
        return choice["finish_reason"] == "length" and choice["message"]["content"]

    seed = next(seed for seed in range(20) if runs_to_the_limit(seed))  # a reply that would not end by itself
    body = {"model": "b", "messages": HELLO, "max_tokens": 100, "temperature": 1.0, "seed": seed}
    before = server["http"].get("/health").json()["models"]["b"]["cancelled"]
    with server["http"].stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if '"content"' in line and '"content": ""' not in line)
        start = time.perf_counter()
        assert server["http"].get("/health").status_code == 200  # the event loop is free meanwhile
        assert time.perf_counter() - start < 2
    deadline = time.monotonic() + 10  # the client left: the worker stops at its next token
    while server["http"].get("/health").json()["models"]["b"]["cancelled"] == before:
        assert time.monotonic() < deadline, "generation went on after the client disconnected"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------- API key


def every_route(server) -> list[tuple[str, str]]:
    """(method, path) of every operation in the schema, and the routes outside it: the page, its files, the
    schema and its viewers, and a route that does not exist."""
    schema = server["http"].get("/openapi.json").json()
    operations = [(method.upper(), path.replace("{item_id}", "web-0123456789abcdef"))
                  for path, methods in schema["paths"].items() for method in methods]
    return operations + [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/openapi.json"), ("GET", "/docs"),
                         ("GET", "/redoc"), ("GET", "/no/such/route"), ("DELETE", "/v1/models")]


def test_every_route_answers_401_without_the_key(server):
    routes = every_route(server)
    assert ("POST", "/v1/chat/completions") in routes and ("POST", "/api/comparisons") in routes
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dXNlcjp3cm9uZw=="},
             {"Authorization": KEY}]
    for method, path in routes:
        for headers in wrong:
            response = httpx.request(method, f"{server['url']}{path}", headers=headers, json={"messages": HELLO})
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers.get_list("www-authenticate")[0].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0).models.list()
    assert not server["data_dir"].joinpath("labels", "x.jsonl").exists()


def test_the_key_opens_every_route_as_bearer_or_as_the_pages_basic_password(server):
    basic = httpx.BasicAuth("anyone", KEY)
    for method, path in every_route(server):
        if method == "GET":
            assert server["http"].get(path).status_code != 401, path
            assert httpx.get(f"{server['url']}{path}", auth=basic).status_code != 401, path
    schema = server["http"].get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {**schema["components"]["securitySchemes"]["apiKey"],
                                                                 "type": "http", "scheme": "bearer"}
    assert all("401" in operation["responses"] for methods in schema["paths"].values() for operation in methods.values())


# ------------------------------------------------------------------------------------------ A/B mode


def new_comparison(server, prompt="Hello! How are you today?", answered=True) -> dict:
    """A comparison of models a and b; with `answered`, one where both replies have text (a random tiny model's
    sampled reply can end at once, and an empty reply cannot be preferred)."""
    for _ in range(10):
        response = post(server, "/api/comparisons", {"prompt": prompt, "models": ["a", "b"], "max_tokens": 8,
                                                     "temperature": 1.0})
        assert response.status_code == 200, response.text
        item = response.json()
        if not answered or all(text.strip() for text in item["replies"].values()):
            return item
    raise AssertionError("ten comparisons in a row had an empty reply")


def test_comparison_is_blinded_until_the_choice(server):
    item = new_comparison(server)
    assert set(item) == {"id", "replies"} and set(item["replies"]) == {"A", "B"}
    result = post(server, f"/api/comparisons/{item['id']}/choice", {"choice": "A", "annotator": "ann"}).json()
    assert sorted(result["key"].values()) == ["a", "b"] and result["winner"] == result["key"]["A"]
    again = post(server, f"/api/comparisons/{item['id']}/choice", {"choice": "B", "annotator": "ann"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "comparison_not_found"


@pytest.mark.parametrize("body", [{"choice": "C", "annotator": "ann"}, {"choice": "A", "annotator": "../etc/x"},
                                  {"choice": "A"}])
def test_bad_choices_are_400(server, body):
    item = new_comparison(server)
    response = post(server, f"/api/comparisons/{item['id']}/choice", body)
    assert response.status_code == 400 and response.json()["error"]["message"]


@pytest.mark.parametrize("body", [{"prompt": "", "models": ["a", "b"]}, {"prompt": " \n\t", "models": ["a", "b"]},
                                  {"prompt": "Hi", "models": ["a", "a"]}, {"prompt": "Hi", "models": ["a"]}])
def test_an_empty_prompt_or_a_model_against_itself_is_400_and_writes_nothing(server, body):
    files_before = sorted(server["data_dir"].rglob("*")) if server["data_dir"].exists() else []
    response = post(server, "/api/comparisons", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in ("prompt", "models")
    assert (sorted(server["data_dir"].rglob("*")) if server["data_dir"].exists() else []) == files_before


def test_preferring_a_reply_over_an_empty_one_is_refused_and_a_tie_still_rates(server):
    """An empty reply is no training data: A or B preferred is refused (409: a well-formed request the comparison's
    state refuses) and nothing is written; the comparison stays pending, and a tie records the rating (no label)."""
    comparisons = Comparisons(server["data_dir"])
    item = comparisons.add(HELLO, [("a", ""), ("b", "Hello there")])
    empty_side = next(side for side, text in item["replies"].items() if not text)
    ratings = server["data_dir"] / "human_ratings.jsonl"
    before = ratings.read_text() if ratings.exists() else ""
    with pytest.raises(EmptyReply):
        comparisons.record(item["id"], "B" if empty_side == "A" else "A", "ann")
    assert (ratings.read_text() if ratings.exists() else "") == before
    assert comparisons.record(item["id"], "tie", "ann")["written"] == [str(ratings)]

    live = new_comparison(server, answered=False)  # the route answers the refusal as a 409
    if not all(text.strip() for text in live["replies"].values()):
        response = post(server, f"/api/comparisons/{live['id']}/choice", {"choice": "A", "annotator": "ann"})
        assert response.status_code == 409 and response.json()["error"]["code"] == "empty_reply"


def test_concurrent_choices_append_whole_lines(server):
    ratings_path = server["data_dir"] / "human_ratings.jsonl"
    labels_dir = server["data_dir"] / "labels"
    ratings_before = len(ratings_path.read_text().splitlines()) if ratings_path.exists() else 0
    items = [new_comparison(server) for _ in range(12)]
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
    assert len(web_ratings) == len(items)
    ids = {item["id"] for item in items}
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
        assert label["meta"]["models"]["chosen"] != label["meta"]["models"]["rejected"]


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
