"""The OpenAI-compatible server: the official `openai` client against a live uvicorn on loopback,
greedy output against the engine run directly, batching of concurrent streams, errors, API keys."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import LiveServer, greedy_reference, make_chat_checkpoint, slow_down_decoding

from lmforge.cli import main
from lmforge.generate.session import Session

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from lmforge.serve.server import create_app  # noqa: E402

MODEL = "tiny"
KEY = "sk-test-key"
WORDS = ["the cat", "the dog", "a mat", "the bone", "sat on", "héllo", "the", "dog ate", "cat sat on the",
         "mat. the", "bone.", "wörld", "the dog ate the", "on the mat", "ate", "the cat sat"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def oracle(checkpoint):
    """Greedy text from the engine run directly, one prompt at a time (the server is not involved)."""
    session = Session.load(checkpoint)

    def greedy(prompt_ids: list[int], max_tokens: int) -> tuple[str, str, int]:
        return greedy_reference(session, prompt_ids, max_tokens)

    greedy.session = session
    return greedy


@pytest.fixture(scope="module")
def server(checkpoint):
    session = Session.load(checkpoint)
    with LiveServer(create_app(session, model_name=MODEL)) as live:
        live.session = session
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion_matches_engine(client, oracle):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    prompt = oracle.session.chat_prompt(messages)
    text, reason, n = oracle(prompt, 20)
    assert out.object == "chat.completion" and out.model == MODEL
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), n)
    assert out.usage.total_tokens == len(prompt) + n

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == text and reasons == [reason]
    assert chunks[-1].usage.completion_tokens == n
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # really streamed


def test_text_completion_matches_generate_command(client, oracle, checkpoint, capsys):
    out = client.completions.create(model=MODEL, prompt="the dog", max_tokens=15, temperature=0)
    text, reason, n = oracle(oracle.session.encode("the dog"), 15)
    assert out.object == "text_completion"
    assert out.choices[0].text == text and out.choices[0].finish_reason == reason
    assert out.usage.completion_tokens == n
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "the dog", "--temperature", "0",
                 "--max-new-tokens", "15"]) == 0
    assert capsys.readouterr().out == out.choices[0].text + "\n"

    pieces = list(client.completions.create(model=MODEL, prompt="the dog", max_tokens=15, temperature=0,
                                            stream=True))
    assert all(p.object == "text_completion" for p in pieces)
    assert "".join(p.choices[0].text for p in pieces) == text
    assert [p.choices[0].finish_reason for p in pieces if p.choices[0].finish_reason] == [reason]


def test_length_stop_strings_n_and_seed(client, oracle):
    full, _, _ = oracle(oracle.session.encode("the cat"), 30)
    short = client.completions.create(model=MODEL, prompt="the cat", max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert full.startswith(short.choices[0].text)
    stop = full.strip()[len(full.strip()) // 2:][:2]
    if stop.strip():
        cut = client.completions.create(model=MODEL, prompt="the cat", max_tokens=30, temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.index(stop)]
    sampled = dict(model=MODEL, prompt="the cat", max_tokens=12, temperature=1.0, top_p=0.95, seed=3, n=3,
                   extra_body={"top_k": 50})
    first, again = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible


def test_concurrent_streams_are_batched(server, oracle):
    engine = server.session.engine
    before_batches = engine.stats.batches
    before_max = engine.stats.max_batch_size
    engine.stats.max_batch_size = 0
    expected = {w: oracle(oracle.session.encode(w), 24)[0] for w in WORDS}
    barrier = threading.Barrier(len(WORDS))

    def run(word: str) -> str:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        barrier.wait()
        stream = client.completions.create(model=MODEL, prompt=word, max_tokens=24, temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream)

    with ThreadPoolExecutor(len(WORDS)) as pool:
        results = dict(zip(WORDS, pool.map(run, WORDS)))
    assert results == expected
    batches = engine.stats.batches - before_batches
    assert engine.stats.max_batch_size > 1 and batches < len(WORDS)
    engine.stats.max_batch_size = max(engine.stats.max_batch_size, before_max)


LONG = {"prompt": "the cat", "max_tokens": 100, "temperature": 1.0, "seed": 0}  # runs to the length limit


@pytest.fixture
def slow_engine(server, monkeypatch):
    """The server's engine with 20 ms decode steps."""
    return slow_down_decoding(server.session.engine, monkeypatch)


def settle(engine) -> int:
    """Tokens generated so far, once the engine has gone quiet."""
    last = -1
    while engine.stats.tokens_generated != last:
        last = engine.stats.tokens_generated
        time.sleep(0.3)
    return last


def test_request_arriving_mid_batch_joins_it(server, slow_engine, oracle):
    before = settle(slow_engine)
    body = {**LONG, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        short = httpx.post(server.url + "/v1/completions", timeout=30,
                           json={"prompt": "the dog", "max_tokens": 3, "temperature": 0})
        during = slow_engine.stats.tokens_generated - before
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 100
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert short.json()["choices"][0]["text"] == oracle(oracle.session.encode("the dog"), 3)[0]
    # The short request finished while the long one was still decoding: it did not wait for it.
    assert during < 100


def test_disconnected_stream_frees_its_row(server, slow_engine):
    before = settle(slow_engine)
    with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one chunk, then hang up
    assert settle(slow_engine) - before < 100  # the abandoned row stopped decoding


def test_disconnected_request_frees_its_row(server, slow_engine):
    before = settle(slow_engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=LONG, timeout=0.3)
    assert settle(slow_engine) - before < 100
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


BAD_REQUESTS = [
    ("chat", b"{not json", 400, None),
    ("chat", {"model": MODEL}, 422, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ("chat", {"messages": "hello"}, 422, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 422, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ("chat", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("text", {"prompt": "the cat", "max_tokens": 128}, 400, "max_tokens"),
    ("text", {"max_tokens": 3}, 422, "prompt"),
    ("text", {"prompt": "the cat", "temperature": -1}, 400, "temperature"),
    ("text", {"prompt": "the cat", "model": "nope"}, 404, "model"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "seed": 99999999999999999999999}, 400, "seed"),
    ("text", {"prompt": "the cat", "seed": -2**63 - 1}, 400, "seed"),
    ("chat", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    ("text", b'{"prompt": "the", "stream_options": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001, 400, None),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 10}}, 400, "logit_bias"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"300": 1}}, 400, "logit_bias"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}, 400,
     "response_format"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}}},
     400, "response_format"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, 422,
     "response_format.type"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "min_tokens": -1}, 400, "min_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ("text", {"prompt": "the cat", "best_of": 2}, 400, "best_of"),
    ("text", {"prompt": "the cat", "logprobs": 21}, 400, "logprobs"),
    ("text", {"prompt": "the cat", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("text", {"prompt": "the cat", "max_tokens": 0}, 400, "max_tokens"),
    ("text", {"prompt": "the cat", "guided_regex": "a+"}, 400, "guided_regex"),
]


@pytest.mark.parametrize("kind, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, kind, body, status, param):
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert error["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


def test_neutral_values_of_unsupported_parameters_are_accepted(server):
    neutral = {"logit_bias": {}, "logprobs": False, "response_format": {"type": "text"}, "tools": [],
               "tool_choice": "none", "presence_penalty": 0, "frequency_penalty": 0.0, "top_logprobs": None}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "the"}], "max_tokens": 2, **neutral})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"prompt": "the", "max_tokens": 2, "echo": False, "best_of": 1, "suffix": None})
    assert r.status_code == 200


def test_oversized_body_is_refused_before_tokenizing(server, monkeypatch):
    """A body over the limit is a 413 whether it declares its length or is sent chunked, and nothing of
    it is tokenized; one under the limit still works."""
    encoded = []
    encode = server.session.encode
    monkeypatch.setattr(server.session, "encode", lambda text: encoded.append(len(text)) or encode(text))
    big = json.dumps({"prompt": "the " * 1_500_000, "max_tokens": 2}).encode()  # 6 MB
    url, headers = server.url + "/v1/completions", {"Content-Type": "application/json"}
    for content in (big, (big[i:i + 2**16] for i in range(0, len(big), 2**16))):
        r = httpx.post(url, content=content, headers=headers, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert encoded == []
    assert httpx.post(url, json={"prompt": "the", "max_tokens": 2}, timeout=30).status_code == 200
    assert encoded == [3]


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert client.completions.create(model=MODEL, prompt="the", max_tokens=2).choices


def test_api_key_is_enforced(checkpoint):
    with LiveServer(create_app(Session.load(checkpoint), api_key=KEY, model_name=MODEL)) as live:
        wrong = openai.OpenAI(base_url=live.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt="the", max_tokens=2)
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(live.url + "/health").status_code == 200  # health needs no key
        right = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in right.models.list().data] == [MODEL]
        out = right.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the cat"}],
                                            max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
