"""The chat page served at `GET /`, driven in headless Chromium: streamed greedy answers against the
engine run directly, the conversation history, errors from the server, the Stop button, no foreign requests."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from browser import HOW_TO_INSTALL, find_chromium
from live_server import LiveServer, greedy_reference, make_chat_checkpoint, slow_down_decoding
from playwright.sync_api import expect, sync_playwright

from lmforge.generate.session import Session
from lmforge.serve.server import create_app

MODEL = "tiny"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
FINISHED = re.compile("^(done|stopped|error)$")

# Records every text the assistant messages go through: each append's previous value, then the
# current one; `window.renders` counts the observer's callbacks, i.e. separate updates of the page.
RECORD_TEXTS = """() => {
  window.texts = []; window.renders = 0;
  new MutationObserver((records) => {
    let last = null;
    for (const r of records) {
      if (r.type === "characterData" && r.target.parentElement?.matches(".msg.assistant")) {
        window.texts.push(r.oldValue);
        last = r.target;
      }
    }
    if (last) { window.texts.push(last.data); window.renders += 1; }
  }).observe(document.getElementById("messages"), {subtree: true, characterData: true, characterDataOldValue: true});
}"""

STOP_AT_FIRST_TEXT = """() => {
  const observer = new MutationObserver(() => {
    if (document.querySelector(".msg.assistant")?.textContent) {
      observer.disconnect();
      document.getElementById("stop").click();
    }
  });
  observer.observe(document.getElementById("messages"), {subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def oracle(checkpoint):
    """Greedy reply to a conversation from the engine run directly (the server is not involved)."""
    session = Session.load(checkpoint)

    def greedy(messages: list[dict], max_tokens: int) -> str:
        prompt = session.chat_prompt(messages)
        assert len(prompt) + max_tokens <= session.context, "the conversation must fit without dropping turns"
        return greedy_reference(session, prompt, max_tokens)[0]

    return greedy


@pytest.fixture(scope="module")
def server(checkpoint):
    session = Session.load(checkpoint)
    with LiveServer(create_app(session, model_name=MODEL)) as live:
        live.session = session
        yield live


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(HOW_TO_INSTALL)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the chat UI with the model list loaded. Uncaught script errors fail the test."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_have_text(MODEL)
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def chat_bodies(page):
    """The JSON bodies of the page's chat requests, in order."""
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def settings(page, **values) -> None:
    for field, value in values.items():
        page.fill(f"#{field.replace('_', '-')}", str(value))


def ask(page, text: str) -> tuple[str, str]:
    """Send `text` with Enter; the state and text of the reply once it has finished."""
    index = page.locator(".msg.assistant").count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    reply = page.locator(".msg.assistant").nth(index)
    expect(reply).to_have_attribute("data-state", FINISHED)
    return reply.get_attribute("data-state"), reply.text_content()


def test_streams_greedy_answers_and_sends_the_history(page, chat_bodies, oracle):
    settings(page, system="be brief", temperature=0, max_tokens=12)
    page.evaluate(RECORD_TEXTS)
    state, first = ask(page, "the cat")
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    body = chat_bodies[0]
    assert body["messages"] == conversation and body["model"] == MODEL and body["stream"] is True
    assert (body["temperature"], body["max_tokens"]) == (0, 12)
    assert state == "done" and first == oracle(conversation, 12)
    assert page.locator(".msg.user").text_content() == "the cat"

    recorded = page.evaluate("window.texts")
    texts = [t for previous, t in zip([""] + recorded, recorded) if t != previous]
    assert texts[-1] == first and len(texts) > 2  # at least two partial texts before the final one
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert page.evaluate("window.renders") > 1  # shown in several updates, not all at the end

    state, second = ask(page, "the dog")
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "the dog"}]
    assert chat_bodies[1]["messages"] == conversation
    assert state == "done" and second == oracle(conversation, 12)


def test_server_errors_show_and_the_page_recovers(page, chat_bodies, server, oracle):
    settings(page, temperature=0, max_tokens=500)
    state, _ = ask(page, "the cat")
    direct = httpx.post(server.url + "/v1/chat/completions", json=chat_bodies[0], timeout=30)
    message = direct.json()["error"]["message"]
    assert direct.status_code == 400 and "context" in message
    assert state == "error"
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text(message)
    expect(page.locator("#error")).to_contain_text("400")
    expect(page.locator("#prompt")).to_have_value("the cat")  # kept for a resend

    settings(page, max_tokens=8)
    state, text = ask(page, "the dog")
    conversation = [{"role": "user", "content": "the dog"}]
    assert chat_bodies[1]["messages"] == conversation  # the failed turn is not in the history
    assert state == "done" and text == oracle(conversation, 8)
    expect(page.locator("#error")).to_be_hidden()


def test_error_events_and_network_errors_show(page):
    partial = "the cat sat"
    events = [{"choices": [{"index": 0, "delta": {"content": partial}, "finish_reason": None}]},
              {"error": {"message": "the engine failed", "type": "server_error", "param": None, "code": None}}]
    sse = "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=sse))
    state, text = ask(page, "hello")
    assert (state, text) == ("error", partial)  # the partial answer stays
    expect(page.locator("#error")).to_contain_text("the engine failed")

    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    state, _ = ask(page, "hello")
    assert state == "error"
    expect(page.locator("#error")).to_contain_text("Network error")


def test_stop_keeps_the_partial_answer_and_frees_the_server(page, chat_bodies, server, oracle, monkeypatch):
    stats = slow_down_decoding(server.session.engine, monkeypatch).stats  # the click lands mid-reply
    before = stats.tokens_generated
    settings(page, temperature=1, seed=1, max_tokens=100)
    page.evaluate(STOP_AT_FIRST_TEXT)  # 100 tokens take a fraction of a second: click from inside the page
    page.fill("#prompt", "the cat")
    page.press("#prompt", "Enter")
    reply = page.locator(".msg.assistant")
    expect(reply).to_have_attribute("data-state", "stopped")
    partial = reply.text_content()
    assert partial
    page.wait_for_timeout(200)
    assert reply.text_content() == partial and page.is_enabled("#send") and page.is_disabled("#stop")

    settings(page, temperature=0, max_tokens=8)
    state, text = ask(page, "the dog")
    conversation = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": partial},
                    {"role": "user", "content": "the dog"}]
    assert chat_bodies[1]["messages"] == conversation  # the stopped answer stays in the history
    assert state == "done" and text == oracle(conversation, 8)
    assert stats.tokens_generated - before < 100  # the stopped request did not keep decoding


def test_new_chat_clears_the_conversation(page, chat_bodies):
    settings(page, temperature=0, max_tokens=4)
    ask(page, "the cat")
    page.click("#new-chat")
    expect(page.locator("#messages .msg")).to_have_count(0)
    ask(page, "the dog")
    assert chat_bodies[1]["messages"] == [{"role": "user", "content": "the dog"}]


def test_api_key_is_sent(browser, checkpoint):
    with LiveServer(create_app(Session.load(checkpoint), api_key="sk-page", model_name=MODEL)) as live:
        context = browser.new_context()
        page = context.new_page()
        page.goto(live.url + "/")
        expect(page.locator("#error")).to_contain_text("HTTP 401: invalid or missing API key")
        expect(page.locator("#model")).to_have_text("unavailable")
        page.fill("#api-key", "sk-page")
        page.press("#api-key", "Tab")  # a changed key reloads the model list
        expect(page.locator("#model")).to_have_text(MODEL)
        expect(page.locator("#error")).to_be_hidden()
        settings(page, max_tokens=4)
        assert ask(page, "the cat")[0] == "done"
        context.close()


def test_no_requests_leave_the_server(browser, server):
    context = browser.new_context()
    page = context.new_page()
    urls = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_have_text(MODEL)
    page.fill("#max-tokens", "4")
    page.fill("#prompt", "the cat")
    page.click("#send")
    expect(page.locator(".msg.assistant")).to_have_attribute("data-state", "done")
    page.wait_for_load_state("networkidle")
    context.close()
    assert {u.split("?")[0] for u in urls} >= {server.url + "/", server.url + "/v1/models",
                                               server.url + "/v1/chat/completions"}
    assert all(u.startswith(server.url + "/") for u in urls), urls
