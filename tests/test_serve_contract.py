"""/openapi.json states what `chatforge serve` does: declared errors, validation rules in the schemas, 405 with
Allow, 413 past the body cap, and a schemathesis run against the live server (started as a deployment would be:
an API key, feedback collection off) that finds no 5xx, no status code the schema does not declare, and no
schema-valid request rejected."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from chatforge.inference.sampling import SamplingParams
from chatforge.serving.app import create_app
from chatforge.serving.local import background_server
from chatforge.serving.worker import ModelRegistry, ModelSpec
from conftest import make_tiny_llama

MAX_BODY_BYTES = 8192
# The one rule no schema can state is that the conversation's tokens fit the model's context; a byte-level token
# is at least one byte of the body, so a context this long holds any body the server accepts.
CONTEXT = MAX_BODY_BYTES + 64
MAX_TOKENS = 16  # `--max-tokens`: the schema's maximum, which keeps the generated requests quick
KEY = "contract-key"
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("contract")
    specs = []
    for seed, name in enumerate(["a", "b"]):
        make_tiny_llama(tiny_tokenizer, seed=seed, context=CONTEXT).save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
        specs.append(ModelSpec(name, root / name))
    app = create_app(ModelRegistry.load(specs, max_batch=8, max_queue=64), SamplingParams(max_new_tokens=16),
                     data_dir=root / "data", max_body_bytes=MAX_BODY_BYTES, api_key=KEY, max_tokens=MAX_TOKENS)
    with background_server(app) as base_url, httpx.Client(base_url=base_url, timeout=60,
                                                           headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield SimpleNamespace(url=base_url, http=http, data_dir=root / "data")


@pytest.fixture(scope="module")
def schema(served):
    return served.http.get("/openapi.json").json()


@pytest.fixture(scope="module")
def feedback_schema():
    """The schema of a server that collects feedback (no model is loaded to build it)."""
    workers = [SimpleNamespace(name=name, context_length=128) for name in ("a", "b")]
    return create_app(ModelRegistry(workers), SamplingParams(), collect_feedback=True).openapi()


def test_every_error_a_route_can_answer_is_declared_with_the_error_object(schema, feedback_schema):
    expected = {("/v1/chat/completions", "post"): {"400", "401", "404", "413", "429", "503"},
                ("/v1/models", "get"): {"401"}, ("/health", "get"): {"401"}}
    check_declared_errors(schema, expected)
    check_declared_errors(feedback_schema, {
        ("/v1/chat/completions", "post"): {"400", "404", "413", "429", "503"},
        ("/api/comparisons", "post"): {"400", "404", "413", "429", "503"},
        ("/api/comparisons/{item_id}/choice", "post"): {"400", "404", "409", "413"},
        ("/v1/models", "get"): set(), ("/health", "get"): set()})


def check_declared_errors(schema: dict, expected: dict) -> None:
    declared = {(path, method): operation["responses"] for path, operations in schema["paths"].items()
                for method, operation in operations.items()}
    assert set(declared) == set(expected)
    for key, errors in expected.items():
        assert set(declared[key]) == {"200"} | errors, key  # FastAPI's 422 is gone: validation answers 400
        for status in errors:
            reference = declared[key][status]["content"]["application/json"]["schema"]["$ref"]
            assert reference == "#/components/schemas/ErrorResponse"
        if "429" in errors:
            assert "Retry-After" in declared[key]["429"]["headers"]
    stream = declared[("/v1/chat/completions", "post")]["200"]["content"]
    assert set(stream) == {"application/json", "text/event-stream"}


def test_validation_rules_are_in_the_request_schemas(schema, feedback_schema):
    components = schema["components"]["schemas"]
    completion = components["ChatCompletionRequest"]
    properties = completion["properties"]
    assert completion["additionalProperties"] is False  # an unknown field is a 400, as OpenAI answers
    assert "assistant prefill" in properties["messages"]["description"]
    assert properties["model"]["examples"] == ["a", "b"]  # the served models, known at startup
    for field in ("max_tokens", "max_completion_tokens"):  # --max-tokens, known at startup
        assert next(shape for shape in properties[field]["anyOf"] if shape.get("type") == "integer")["maximum"] == 16
    stop_shapes = {shape.get("type") for shape in properties["stop"]["anyOf"]}
    assert stop_shapes == {"string", "array", "null"}
    temperature = next(shape for shape in properties["temperature"]["anyOf"] if shape.get("type") == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 2.0)
    assert properties["tools"]["anyOf"][0]["maxItems"] == 0 and "Not implemented" in properties["tools"]["description"]
    assert completion["then"] == {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}
    assert schema["security"] == [{"apiKey": []}]

    feedback = feedback_schema["components"]["schemas"]
    assert feedback["ChoiceRequest"]["properties"]["annotator"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
    assert feedback["ComparisonRequest"]["properties"]["prompt"]["pattern"] == r"\S"
    models = feedback["ComparisonRequest"]["properties"]["models"]
    assert (models["minItems"], models["maxItems"], models["uniqueItems"], models["examples"]) == (2, 2, True, [["a", "b"]])
    choice_path = feedback_schema["paths"]["/api/comparisons/{item_id}/choice"]["post"]["parameters"][0]["schema"]
    assert choice_path["pattern"] == "^web-[0-9a-f]{16}$"


def test_feedback_routes_are_off_by_default_and_write_nothing(served):
    comparison = {"prompt": "Hi", "models": ["a", "b"]}
    assert served.http.post("/api/comparisons", json=comparison).status_code == 404
    choice = {"choice": "A", "annotator": "ann"}
    assert served.http.post("/api/comparisons/web-0123456789abcdef/choice", json=choice).status_code == 404
    assert served.http.get("/health").json()["collect_feedback"] is False
    assert not served.data_dir.exists()


def test_a_wrong_method_is_405_with_allow(served):
    response = served.http.put("/v1/chat/completions", json={})
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert response.json()["error"]["message"]
    assert served.http.delete("/v1/models").headers["Allow"] == "GET"


def test_a_body_over_the_cap_is_413_declared_or_streamed(served):
    http = served.http
    big = {"messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    declared = http.post("/v1/chat/completions", json=big)
    assert declared.status_code == 413 and declared.json()["error"]["type"] == "invalid_request_error"

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 512 + 1):
            yield b"y" * 512
        yield b'"}]}'

    chunked = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).status_code == 200


SCHEMATHESIS_CONFIG = """
# An oversized body is a rejection too (schemathesis leaves 413 out of its default list).
[checks.negative_data_rejection]
expected-statuses = [400, 401, 404, 405, 413, 429]
"""


def test_schemathesis_finds_no_server_error_no_undocumented_status_and_no_valid_request_rejected(served, tmp_path):
    """Every built-in check, positive_data_acceptance included: a request the schema allows is answered 2xx (or
    404 for a model name that is not served, 429 when the queue is full). Without the key, every operation is
    checked to answer 401 (ignored_auth)."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    command = [str(schemathesis), "run", f"{served.url}/openapi.json", "--checks", "all",
               "--header", f"Authorization: Bearer {KEY}", "--max-examples", "25", "--seed", "0",
               "--workers", "1", "--generation-database", "none", "--no-color", "--request-timeout", "60"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    report = result.stdout[result.stdout.find("FAILURES"):][:6000] + result.stdout[-1500:] + result.stderr[-1000:]
    assert result.returncode == 0, report
    assert " passed" in report and "failed" not in report.split("SUMMARY")[-1]
