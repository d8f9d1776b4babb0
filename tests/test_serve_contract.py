"""/openapi.json states what `chatforge serve` does: declared errors, validation rules in the schemas, 405 with
Allow, 413 past the body cap, and a schemathesis run against the live server that finds no 5xx and no status
code the schema does not declare."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from chatforge.generation import SamplingParams
from chatforge.serving.app import create_app
from chatforge.serving.local import background_server
from chatforge.serving.worker import ModelRegistry
from conftest import save_tiny_models

MAX_BODY_BYTES = 4096
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("contract")
    specs = save_tiny_models(root, tiny_tokenizer, ["a", "b"])
    app = create_app(ModelRegistry.load(specs, max_batch=8, max_queue=64), SamplingParams(max_new_tokens=16),
                     data_dir=root / "data", max_body_bytes=MAX_BODY_BYTES)
    with background_server(app) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def schema(url):
    return httpx.get(f"{url}/openapi.json").json()


def test_every_error_a_route_can_answer_is_declared_with_the_error_object(schema):
    expected = {("/v1/chat/completions", "post"): {"400", "404", "413", "429", "503"},
                ("/api/comparisons", "post"): {"400", "404", "413", "429", "503"},
                ("/api/comparisons/{item_id}/choice", "post"): {"400", "404", "413"},
                ("/v1/models", "get"): set(), ("/health", "get"): set()}
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


def test_validation_rules_are_in_the_request_schemas(schema):
    components = schema["components"]["schemas"]
    completion = components["ChatCompletionRequest"]["properties"]
    assert components["ChoiceRequest"]["properties"]["annotator"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
    assert "last message must have role 'user'" in completion["messages"]["description"]
    assert completion["model"]["examples"] == ["a", "b"]  # the served models, known at startup
    stop_shapes = {shape.get("type") for shape in completion["stop"]["anyOf"]}
    assert stop_shapes == {"string", "array", "null"}
    temperature = next(shape for shape in completion["temperature"]["anyOf"] if shape.get("type") == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 2.0)
    choice_path = schema["paths"]["/api/comparisons/{item_id}/choice"]["post"]["parameters"][0]["schema"]
    assert choice_path["pattern"] == "^web-[0-9a-f]{16}$"


def test_a_wrong_method_is_405_with_allow(url):
    response = httpx.put(f"{url}/v1/chat/completions", json={})
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert response.json()["error"]["message"]
    assert httpx.delete(f"{url}/v1/models").headers["Allow"] == "GET"


def test_a_body_over_the_cap_is_413_declared_or_streamed(url):
    big = {"messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    declared = httpx.post(f"{url}/v1/chat/completions", json=big)
    assert declared.status_code == 413 and declared.json()["error"]["type"] == "invalid_request_error"

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 512 + 1):
            yield b"y" * 512
        yield b'"}]}'

    chunked = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).status_code == 200


SCHEMATHESIS_CONFIG = """
# An oversized body is a rejection too (schemathesis leaves 413 out of its default list).
[checks.negative_data_rejection]
expected-statuses = [400, 404, 405, 413, 429]
"""


def test_schemathesis_finds_no_server_error_and_no_undocumented_status(url, tmp_path):
    """Every built-in check but positive_data_acceptance: two rules JSON Schema cannot state (the last message
    is the user's; the prompt plus max_tokens fits the context) are described in the schema and answered 400,
    which that check counts as a schema-valid request rejected."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    command = [str(schemathesis), "run", f"{url}/openapi.json", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--max-examples", "25", "--seed", "0",
               "--workers", "1", "--generation-database", "none", "--no-color", "--request-timeout", "60"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    report = result.stdout[result.stdout.find("FAILURES"):][:6000] + result.stdout[-1500:] + result.stderr[-1000:]
    assert result.returncode == 0, report
    assert " passed" in report and "failed" not in report.split("SUMMARY")[-1]
