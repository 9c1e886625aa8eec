"""Journey 6, Serve, through the command line alone: `lmforge serve --checkpoint DIR` runs as a real
process; the official `openai` client chats with it, streamed and not, and gets transformers' greedy
reply; the chat page is at `/`; it listens on 127.0.0.1 only; `--api-key` turns strangers away."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import openai
import pytest
import torch
from live_server import lmforge_serve, make_chat_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
MAX_TOKENS = 24
KEY = "sk-journey"


def accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is accepted."""
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny sharpened chat llama, in a folder whose name becomes the served model's id."""
    return make_chat_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-chat", tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def hf_reply(checkpoint) -> tuple[str, str, int]:
    """(text, finish reason, prompt tokens) of transformers' greedy reply to MESSAGES: the chat
    template rendered by its tokenizer, stopping at EOS or `<|im_end|>` (lmforge is not involved)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    reason = "stop" if new[-1] in stops else "length"
    return tokenizer.decode(new, skip_special_tokens=True), reason, ids.shape[1]


def streamed_chat(client: openai.OpenAI, model: str) -> tuple[str, list[str], int]:
    """(text, finish reasons, chunks that carried text) of a streamed greedy chat completion."""
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    return text, reasons, sum(bool(c.choices[0].delta.content) for c in chunks)


def test_serve_command_chats_with_the_openai_client_and_the_page_on_loopback(tmp_path, checkpoint, hf_reply):
    expected, reason, prompt_tokens = hf_reply
    with lmforge_serve(tmp_path / "serve.log", "--checkpoint", str(checkpoint)) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]

        text, reasons, pieces = streamed_chat(client, "tiny-chat")
        assert (text, reasons) == (expected, [reason]) and pieces > 1
        whole = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                               temperature=0)
        assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == reason
        assert whole.usage.prompt_tokens == prompt_tokens

        page = httpx.get(served.url + "/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<title>lmforge chat</title>" in page.text and '<div id="messages" role="log"' in page.text

        # 127.0.0.2 is loopback too: a wildcard bind accepts it there, a 127.0.0.1 bind refuses it.
        with socket.create_server(("0.0.0.0", 0)) as wildcard:
            assert accepts("127.0.0.2", wildcard.getsockname()[1])
        assert not accepts("127.0.0.2", served.port)
        assert f"Uvicorn running on http://127.0.0.1:{served.port}" in served.output()


def test_serve_command_with_an_api_key_answers_strangers_with_401(tmp_path, checkpoint, hf_reply):
    with lmforge_serve(tmp_path / "serve.log", "--checkpoint", str(checkpoint), "--api-key", KEY) as served:
        r = httpx.post(served.url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_api_key")
        stranger = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as raised:
            stranger.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)
        assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
        assert httpx.get(served.url + "/", timeout=10).status_code == 200  # the page asks for the key itself

        owner = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        text, reasons, _ = streamed_chat(owner, "tiny-chat")
        assert text == hf_reply[0] and reasons == [hf_reply[1]]
