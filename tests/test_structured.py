"""Structured output: replies of a tiny random model constrained by JSON schemas, `json_object`, regular
expressions and choices, checked with `jsonschema`, through the official `openai` client, the Python
API and `lmforge generate --json-schema`; constrained and plain rows batched together."""

from __future__ import annotations

import json
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import LiveServer, make_chat_checkpoint

from lmforge.cli import main
from lmforge.generate.grammar import Grammar, GrammarError
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
from lmforge.serve.server import create_app  # noqa: E402

MODEL = "tiny"
WORDS = ["the cat", "the dog", "a mat", "the bone", "sat on", "héllo", "the", "dog ate"]


def field_schema(rng: random.Random, depth: int) -> dict:
    """One property's schema, drawn from the fixed shapes (bounded, so that a random model ends them)."""
    kinds = ["string", "integer", "number", "boolean", "enum", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "integer":
        return {"type": "integer", "minimum": -50, "maximum": rng.randint(0, 999)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 10}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cat", "dog", 1, 2], rng.randint(1, 4))}
    if kind == "array":
        items = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3},
                            {"type": "boolean"}])
        return {"type": "array", "items": items, "maxItems": rng.randint(1, 3)}
    return object_schema(rng, depth + 1)


def object_schema(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(["name", "age", "city", "score", "tags", "ok", "color", "child", "id", "note"], rng.randint(1, 4))
    props = {n: field_schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [object_schema(random.Random(seed)) for seed in range(20)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("corpus"), context=512)


@pytest.fixture(scope="module")
def session(checkpoint):
    return Session.load(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint):
    served = Session.load(checkpoint)
    with LiveServer(create_app(served, model_name=MODEL)) as live:
        live.session = served
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


def test_random_schemas_give_valid_json_concurrently(server, client):
    """20 schemas sent at once (one batch): every reply ends by itself and validates."""
    barrier = threading.Barrier(len(SCHEMAS))

    def ask(i: int):
        barrier.wait()
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": WORDS[i % len(WORDS)]}], max_tokens=300,
            temperature=1.0, seed=i, response_format=schema_format(SCHEMAS[i]))

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        replies = list(pool.map(ask, range(len(SCHEMAS))))
    for schema, reply in zip(SCHEMAS, replies):
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_json_object_streamed_and_completions_extension(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the cat"}],
                                            max_tokens=200, temperature=1.0, seed=1, stream=True,
                                            response_format={"type": "json_object"})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(content), dict)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    schema = SCHEMAS[3]
    out = client.completions.create(model=MODEL, prompt="the dog", max_tokens=300, temperature=1.0, seed=2,
                                    extra_body={"response_format": schema_format(schema)})
    jsonschema.validate(json.loads(out.choices[0].text), schema)


def test_mixed_concurrent_requests_equal_single_ones(server, client):
    """16 greedy requests, half constrained, sent together: each equals the same request sent alone."""
    def request(i: int) -> dict:
        body = dict(model=MODEL, messages=[{"role": "user", "content": WORDS[i % len(WORDS)]}], max_tokens=40,
                    temperature=0)
        if i % 2:
            body["response_format"] = schema_format(SCHEMAS[i])
        return body

    def text(body: dict) -> tuple[str, str]:
        out = client.chat.completions.create(**body)
        return out.choices[0].message.content, out.choices[0].finish_reason

    alone = [text(request(i)) for i in range(16)]
    barrier = threading.Barrier(16)

    def together(i: int) -> tuple[str, str]:
        barrier.wait()
        return text(request(i))

    batches = server.session.engine.stats.batches
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(together, range(16))) == alone
    assert server.session.engine.stats.batches - batches < 16


def test_python_api_regex_choice_and_schema(session):
    prompt = session.chat_prompt([{"role": "user", "content": "the cat"}])
    for seed in range(3):
        regex = session.sampling(SamplingParams(max_new_tokens=40, seed=seed, grammar=Grammar.regex(r"[0-9]{2}-[ab]")))
        choice = session.sampling(SamplingParams(max_new_tokens=40, seed=seed,
                                                 grammar=Grammar.choice(["yes", "no", "the cat"])))
        schema = session.sampling(SamplingParams(max_new_tokens=300, seed=seed,
                                                 grammar=Grammar.json_schema(json.dumps(SCHEMAS[5]))))
        plain = session.sampling(SamplingParams(max_new_tokens=5, seed=seed))
        out = complete(session.engine, session.tokenizer, [prompt, prompt], regex)
        assert all(re.fullmatch(r"[0-9]{2}-[ab]", c.text) and c.finish_reason == "stop" for c in out)
        assert "".join(session.stream(prompt, choice)) in ("yes", "no", "the cat")
        jsonschema.validate(json.loads("".join(session.stream(prompt, schema))), SCHEMAS[5])
        assert len(complete(session.engine, session.tokenizer, [prompt], plain)[0].token_ids) == 5
    with pytest.raises(GrammarError):
        session.grammars.compile(Grammar.regex("(unclosed"))


def test_generate_command_json_schema(checkpoint, tmp_path, capsys):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMAS[7]))
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "the dog", "--json-schema", str(path),
                 "--max-new-tokens", "300", "--seed", "4"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMAS[7])
    path.write_text("{not json")
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "the dog", "--json-schema", str(path)]) != 0
    assert "schema.json" in capsys.readouterr().err
