"""The API describes itself: every route's request body, response bodies and error statuses are in
`/openapi.json`, real responses match what it declares (checked with `jsonschema`), and schemathesis,
run over all its phases against a live server, finds no failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, make_chat_checkpoint

from lmforge.generate.session import Session

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("schemathesis")
from lmforge.serve.server import create_app  # noqa: E402

MODEL = "tiny"
ROOT = Path(__file__).resolve().parent.parent
POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
BODY_ERRORS = {"400", "401", "404", "405", "413", "422", "500"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(create_app(Session.load(checkpoint), model_name=MODEL)) as live:
        yield live


@pytest.fixture(scope="module")
def spec(server):
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200
    return r.json()


def validate(spec: dict, component: str, instance) -> None:
    """`instance` against the declared component, its references resolved within the document."""
    schema = {"$ref": f"#/components/schemas/{component}", "components": spec["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_every_route_declares_its_bodies_and_error_statuses(server, spec):
    assert set(spec["paths"]) == {"/health", "/v1/models", "/v1/models/{model_id}", *POSTS}
    for path in POSTS:
        operation = spec["paths"][path]["post"]
        assert operation["requestBody"]["required"]
        assert "$ref" in operation["requestBody"]["content"]["application/json"]["schema"]
        assert set(operation["responses"]) == {"200"} | BODY_ERRORS
        for status in BODY_ERRORS:
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    for path in POSTS[:2]:
        assert set(spec["paths"][path]["post"]["responses"]["200"]["content"]) == {"application/json",
                                                                                   "text/event-stream"}
    assert set(spec["paths"]["/v1/models/{model_id}"]["get"]["responses"]) == {"200", "401", "404", "405", "422", "500"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's 422 body is not what we send
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]


def test_api_key_is_declared_as_bearer_security(checkpoint, spec):
    secured = create_app(Session.load(checkpoint), model_name=MODEL, api_key="sk-test").openapi()
    assert secured["components"]["securitySchemes"] == {"APIKey": {"type": "http", "scheme": "bearer"}}
    for path, operations in secured["paths"].items():
        for operation in operations.values():
            assert operation.get("security") == ([{"APIKey": []}] if path.startswith("/v1/") else None)
    assert "securitySchemes" not in spec["components"]


def stream_events(r: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]


def test_responses_match_their_declared_schemas(server, spec):
    url = server.url
    validate(spec, "Health", httpx.get(url + "/health").json())
    validate(spec, "ModelList", httpx.get(url + "/v1/models").json())
    validate(spec, "Model", httpx.get(url + f"/v1/models/{MODEL}").json())
    chat = {"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 6, "n": 2}
    validate(spec, "ChatCompletion", httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).json())
    text = {"prompt": ["the", "the dog"], "max_tokens": 6}
    validate(spec, "Completion", httpx.post(url + "/v1/completions", json=text, timeout=60).json())
    for path, body, chunk in [("/v1/chat/completions", chat, "ChatCompletionChunk"),
                              ("/v1/completions", text, "CompletionChunk")]:
        r = httpx.post(url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                       timeout=60)
        assert r.headers["content-type"].startswith("text/event-stream")
        events = stream_events(r)
        assert events[-1] == "[DONE]" and len(events) > 2
        for event in events[:-1]:
            validate(spec, chunk, json.loads(event))
    for encoding_format in ("float", "base64"):
        r = httpx.post(url + "/v1/embeddings", json={"input": ["a", "b"], "encoding_format": encoding_format},
                       timeout=60)
        validate(spec, "EmbeddingList", r.json())


ERRORS = [("GET", "/v1/models/gpt-9", None, 404), ("DELETE", "/v1/models", None, 405),
          ("GET", "/v1/embeddings", None, 405), ("POST", "/v1/embeddings", b"{", 400),
          ("POST", "/v1/embeddings", b'{"input": 5}', 422), ("POST", "/v1/completions", b"x" * 5_000_000, 413),
          ("GET", "/v2/nothing", None, 404)]


@pytest.mark.parametrize("method, path, content, status", ERRORS)
def test_errors_are_declared_error_bodies(server, spec, method, path, content, status):
    r = httpx.request(method, server.url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == status
    validate(spec, "ErrorResponse", r.json())
    if status == 405:  # the methods the route does take
        assert r.headers["allow"] == ("POST" if path == "/v1/embeddings" else "GET")


@pytest.mark.slow
def test_schemathesis_finds_no_failures(server, tmp_path):
    """Every phase (examples, coverage, fuzzing, stateful), every check, a small bounded run on loopback."""
    command = [str(Path(sys.executable).parent / "schemathesis"), "--no-color", "--config-file",
               str(ROOT / "schemathesis.toml"), "run", server.url + "/openapi.json", "--max-examples", "25",
               "--seed", "19", "--workers", "1", "--generation-database", "none"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    summary = result.stdout[result.stdout.index("Test Phases:"):]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in summary, summary
    assert "No issues found" in result.stdout
