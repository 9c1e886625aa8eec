"""`/v1/embeddings`: the official `openai` client against a live server, each of OpenAI's input forms
and both encodings equal to sentence-transformers' own `encode` of the same text."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from live_server import LiveServer, lmforge_serve, make_chat_checkpoint

from lmforge.generate.session import Session
from lmforge.rag import embed
from lmforge.rag.documents import Document
from lmforge.rag.store import Store
from lmforge.serve import embeddings as embeddings_module

openai = pytest.importorskip("openai")
sentence_transformers = pytest.importorskip("sentence_transformers")
from lmforge.serve.server import create_app  # noqa: E402

MODEL = "tiny"
TEXTS = ["The food was delicious and the waiter was friendly.", "héllo wörld 👋", "a",
         "Nora Yilmaz works for Kestrel Dynamics in Lyon."]
MIN_COSINE = 1 - 1e-5


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' own model object for the bundled all-MiniLM-L6-v2 (not lmforge's loader)."""
    return sentence_transformers.SentenceTransformer(str(embed.default_model_path()), device="cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(create_app(Session.load(checkpoint), model_name=MODEL)) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def assert_same_directions(got, expected) -> None:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    cosine = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cosine.min() >= MIN_COSINE, cosine
    assert np.allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-5)


@pytest.mark.parametrize("form", ["string", "strings", "token ids", "lists of token ids"])
@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_each_input_form_equals_sentence_transformers(client, reference, form, encoding_format):
    ids = [reference.tokenizer(text)["input_ids"] for text in TEXTS]
    texts, value = {"string": (TEXTS[:1], TEXTS[0]), "strings": (TEXTS, TEXTS),
                    "token ids": (TEXTS[:1], ids[0]), "lists of token ids": (TEXTS, ids)}[form]
    out = client.embeddings.create(model=MODEL, input=value, encoding_format=encoding_format)
    assert out.object == "list" and out.model == "all-MiniLM-L6-v2"
    assert [d.index for d in out.data] == list(range(len(texts))) and all(d.object == "embedding" for d in out.data)
    if encoding_format == "base64":  # the official client hands base64 back as sent
        vectors = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in out.data]
    else:
        vectors = [d.embedding for d in out.data]
    assert_same_directions(vectors, reference.encode(texts))
    tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in texts)
    assert out.usage.prompt_tokens == out.usage.total_tokens == tokens


def test_client_default_decodes_base64(client, reference):
    """Without `encoding_format` the official client asks for base64 and decodes it into floats itself."""
    out = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    assert_same_directions([d.embedding for d in out.data], reference.encode(TEXTS))
    assert len(out.data[0].embedding) == 384


BAD = [
    ({"input": "hi", "dimensions": 128}, 400, "dimensions"),
    ({"input": "hi", "model": "text-embedding-3-small"}, 404, "model"),
    ({"input": "word " * 300}, 400, "input"),
    ({"input": [101, 10**6, 102]}, 400, "input"),
    ({"input": [101] * 300}, 400, "input"),
    ({"input": ""}, 422, "input"),
    ({"input": []}, 422, "input"),
    ({"input": [[]]}, 422, "input"),
    ({"input": ["a", 5]}, 422, "input"),
    ({"input": "hi", "encoding_format": "int8"}, 422, "encoding_format"),
    ({"model": MODEL}, 422, "input"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests_name_the_parameter(server, body, status, param):
    r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"].split(".")[0] == param


def test_dimensions_equal_to_the_encoders_are_accepted(client):
    out = client.embeddings.create(model=MODEL, input="hi", dimensions=384, encoding_format="float")
    assert len(out.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="hi", dimensions=64)


def test_default_encoder_loads_on_first_use_once(checkpoint, monkeypatch):
    loads = []

    def load(path=None):
        loads.append(path)
        return embed.load_embedder(path)

    monkeypatch.setattr(embeddings_module, "load_embedder", load)
    with LiveServer(create_app(Session.load(checkpoint), model_name=MODEL)) as live:
        assert loads == []
        for _ in range(2):
            assert httpx.post(live.url + "/v1/embeddings", json={"input": "hi"}, timeout=60).status_code == 200
    assert loads == [None]


def test_store_and_embeddings_share_one_encoder(checkpoint, tmp_path, monkeypatch, reference):
    store = Store.create(tmp_path / "store")
    store.add([Document("d1", "Nora Yilmaz works for Kestrel Dynamics in Lyon.")], progress=False)
    monkeypatch.setattr(embeddings_module, "load_embedder", lambda path=None: pytest.fail("a second encoder"))
    with LiveServer(create_app(Session.load(checkpoint), model_name=MODEL, store=store)) as live:
        r = httpx.post(live.url + "/v1/embeddings", json={"input": TEXTS[3], "encoding_format": "float"}, timeout=60)
    assert r.status_code == 200
    vector = r.json()["data"][0]["embedding"]
    assert_same_directions([vector], reference.encode(TEXTS[3:]))
    assert_same_directions([vector], store.embedder.encode(TEXTS[3:]))


@pytest.mark.slow
def test_serve_command_embedding_model_flag(checkpoint, tmp_path, reference):
    with lmforge_serve(tmp_path / "serve.log", "--checkpoint", str(checkpoint), "--model-name", MODEL,
                       "--embedding-model", str(embed.default_model_path())) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.embeddings.create(model=MODEL, input=TEXTS[:2], encoding_format="float")
    assert_same_directions([d.embedding for d in out.data], reference.encode(TEXTS[:2]))
