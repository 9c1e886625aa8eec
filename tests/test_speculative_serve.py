"""Speculative decoding in `lmforge serve` and `lmforge eval`: greedy completions and chat completions (streamed
and not) from a server with a drafter (prompt lookup, the model drafting for itself, a noisy copy of it) equal
those of a server without one; requests speculative decoding cannot serve fall back to the batch with the same
output; `/metrics` counts what a direct run of the same decoding counts; `eval --prompt-lookup` gives the same
answers and scores as plain decoding; bad flags are one-line errors."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from live_server import LiveServer, lmforge_serve, make_chat_checkpoint

from lmforge.checkpoint import load_model, save_model
from lmforge.cli import main
from lmforge.generate.session import Session
from lmforge.generate.speculative import (
    DraftModel, PromptLookup, SpeculativeDecoding, SpeculativeStats, speculative_stream,
)
from lmforge.tokenizer import Tokenizer

pytest.importorskip("uvicorn")
from lmforge.serve.server import create_app  # noqa: E402

MODEL = "tiny"
REPEATS = "the cat sat on the mat. the dog ate the bone. the cat sat on the"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": REPEATS}]
GREEDY = [  # (route, body): what speculative decoding serves
    ("text", {"prompt": REPEATS, "max_tokens": 30, "temperature": 0}),
    ("text", {"prompt": "the dog", "max_tokens": 7, "temperature": 0}),  # ends at the length limit
    ("text", {"prompt": [REPEATS], "max_tokens": 20, "temperature": 0, "echo": True}),
    ("chat", {"messages": CHAT, "max_tokens": 30, "temperature": 0}),
    ("chat", {"messages": [{"role": "user", "content": "héllo wörld héllo"}], "max_tokens": 25, "temperature": 0}),
]  # and the first and the last again, cut at a stop string from the middle of their replies (see `plain`)
FALLBACK = [  # what it cannot serve: decoded in the batch
    ("text", {"prompt": REPEATS, "max_tokens": 20, "temperature": 0, "presence_penalty": 1.5}),
    ("text", {"prompt": REPEATS, "max_tokens": 20, "temperature": 0, "logit_bias": {"5": 3}}),
    ("text", {"prompt": REPEATS, "max_tokens": 20, "temperature": 0, "logprobs": 2}),
    ("text", {"prompt": [REPEATS, "the dog"], "max_tokens": 20, "temperature": 0}),
    ("chat", {"messages": CHAT, "max_tokens": 20, "temperature": 0, "n": 2}),
    ("chat", {"messages": CHAT, "max_tokens": 20, "temperature": 0, "response_format": {"type": "json_object"}}),
    ("chat", {"messages": CHAT, "max_tokens": 20, "temperature": 0, "min_tokens": 3}),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def noisy_draft(checkpoint, tmp_path_factory):
    """The model with noise (a tenth of its spread) added to every matrix: a draft that agrees only sometimes."""
    model = load_model(checkpoint)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.1)
    out = tmp_path_factory.mktemp("draft") / "model"
    save_model(model, out, tokenizer=Tokenizer.from_dir(checkpoint))
    return out


@pytest.fixture(scope="module")
def plain(checkpoint):
    """The requests speculative decoding serves, and every request's reply from a server without a drafter."""
    with LiveServer(create_app(Session.load(checkpoint), model_name=MODEL)) as live:
        greedy = list(GREEDY)
        for route, body in (GREEDY[0], GREEDY[-1]):
            text = ask(live.url, route, body, False)[0][0]
            stop = next(text[i : i + 2] for i in range(len(text) // 2, len(text) - 1)
                        if "\ufffd" not in text[i : i + 2] and text[i : i + 2].strip())
            greedy.append((route, {**body, "stop": [stop]}))
            assert ask(live.url, *greedy[-1], False)[1] == ["stop"]  # cut there, before the length limit
        yield greedy, {json.dumps(r): ask(live.url, *r, stream) for r in greedy + FALLBACK for stream in (False, True)}


def ask(url: str, route: str, body: dict, stream: bool) -> tuple:
    """(texts, finish reasons, completion tokens) of each choice, streamed or whole (usage asked for either way)."""
    path = url + ("/v1/chat/completions" if route == "chat" else "/v1/completions")
    if not stream:
        r = httpx.post(path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        texts = [c["message"]["content"] if route == "chat" else c["text"] for c in out["choices"]]
        return texts, [c["finish_reason"] for c in out["choices"]], out["usage"]["completion_tokens"]
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    texts, reasons, usage = {}, {}, None
    with httpx.stream("POST", path, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                piece = (c["delta"].get("content") or "") if route == "chat" else c["text"]
                texts[c["index"]] = texts.get(c["index"], "") + piece
                if c["finish_reason"]:
                    reasons[c["index"]] = c["finish_reason"]
    return [texts[i] for i in sorted(texts)], [reasons[i] for i in sorted(reasons)], usage["completion_tokens"]


def metrics(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {m[1]: float(m[2]) for m in re.finditer(r'^lmforge:(\w+)\{model_name="tiny"\} (\S+)$', r.text, re.M)}


def drafters(kind: str, checkpoint, noisy_draft):
    return {"lookup": PromptLookup(k=4), "self": DraftModel(Session.load(checkpoint).model, k=3),
            "noisy": DraftModel(Session.load(noisy_draft).model, k=3)}[kind]


@pytest.mark.parametrize("kind", ["lookup", "self", "noisy"])
def test_greedy_replies_equal_the_server_without_a_drafter(kind, checkpoint, noisy_draft, plain):
    greedy, replies = plain
    session = Session.load(checkpoint)
    with LiveServer(create_app(session, model_name=MODEL, drafter=drafters(kind, checkpoint, noisy_draft))) as live:
        for request in greedy:
            for stream in (False, True):
                assert ask(live.url, *request, stream) == replies[json.dumps(request)], (request, stream)
        figures = metrics(live.url)
        assert figures["spec_decode_requests_total"] == 2 * len(greedy)
        assert figures["spec_decode_fallback_requests_total"] == 0
        assert figures["spec_decode_num_draft_tokens_total"] > 0
        if kind == "self":  # greedy drafts by the model itself: every one is kept
            assert figures["spec_decode_draft_acceptance_rate"] == 1.0
        # Sampled replies are decoded speculatively too; a seeded one is reproducible.
        sampled = ("text", {"prompt": REPEATS, "max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 7})
        assert ask(live.url, *sampled, False) == ask(live.url, *sampled, True)


def test_unsupported_requests_fall_back_to_the_batch_with_the_same_replies(checkpoint, plain):
    """Concurrent requests, speculated and batched side by side, each get the reply of the plain server."""
    greedy, expected = plain
    with LiveServer(create_app(Session.load(checkpoint), model_name=MODEL, drafter=PromptLookup(k=4))) as live:
        requests = [(r, stream) for r in greedy + FALLBACK for stream in (False, True)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda rs: ask(live.url, *rs[0], rs[1]), requests))
        for (request, stream), reply in zip(requests, replies):
            assert reply == expected[json.dumps(request)], (request, stream)
        figures = metrics(live.url)
    assert figures["spec_decode_requests_total"] == 2 * len(greedy)
    assert figures["spec_decode_fallback_requests_total"] == 2 * len(FALLBACK)


def test_metrics_count_what_a_direct_run_counts(checkpoint):
    session = Session.load(checkpoint)
    expected = SpeculativeStats()
    params = session.greedy(30)
    prompts = [session.encode(REPEATS), session.chat_prompt(CHAT)]
    for prompt in prompts:
        list(speculative_stream(session.model, prompt, params, PromptLookup(k=4), expected))
    with LiveServer(create_app(session, model_name=MODEL, drafter=PromptLookup(k=4))) as live:
        before = metrics(live.url)
        assert before["spec_decode_num_draft_tokens_total"] == 0 and before["spec_decode_draft_acceptance_rate"] == 0
        ask(live.url, *GREEDY[0], False)
        ask(live.url, *GREEDY[3], True)
        figures = metrics(live.url)
    assert figures["spec_decode_num_drafts_total"] == expected.verifications
    assert figures["spec_decode_num_draft_tokens_total"] == expected.drafted
    assert figures["spec_decode_num_accepted_tokens_total"] == expected.accepted
    assert figures["spec_decode_num_emitted_tokens_total"] == expected.generated
    assert figures["spec_decode_draft_acceptance_rate"] == pytest.approx(expected.accepted / expected.drafted)


def settled(url: str) -> float:
    """The tokens generated speculatively so far, once the worker has gone quiet."""
    last = -1.0
    while (now := metrics(url)["spec_decode_num_emitted_tokens_total"]) != last:
        last = now
        time.sleep(0.3)
    return last


def test_an_abandoned_speculative_request_stops_decoding(checkpoint, monkeypatch):
    """With 20 ms per check, a client that hangs up after 0.3 s leaves a 100-token reply unfinished, and its
    sequence stops decoding; the same request waited for is 100 tokens long."""
    step = SpeculativeDecoding.step
    monkeypatch.setattr(SpeculativeDecoding, "step", lambda self: time.sleep(0.02) or step(self))
    body = {"prompt": "the cat", "max_tokens": 100, "temperature": 0}
    with LiveServer(create_app(Session.load(checkpoint), model_name=MODEL, drafter=PromptLookup(k=2))) as live:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json=body, timeout=0.3)
        emitted = settled(live.url)
        assert 0 < emitted < 100
        whole = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
        assert whole["usage"]["completion_tokens"] == 100
        assert metrics(live.url)["spec_decode_num_emitted_tokens_total"] == emitted + 100


def test_serve_command_with_prompt_lookup(tmp_path, checkpoint, plain):
    with lmforge_serve(tmp_path / "serve.log", "--checkpoint", str(checkpoint), "--model-name", MODEL,
                       "--prompt-lookup", "4") as served:
        assert ask(served.url, *GREEDY[3], True) == plain[1][json.dumps(GREEDY[3])]
        assert metrics(served.url)["spec_decode_requests_total"] == 1
        assert "speculative decoding (PromptLookup, k=4)" in served.output()


def one_line_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_bad_speculative_flags_are_one_line_errors(checkpoint, chat_base, capsys, tmp_path):
    serve = ["serve", "--checkpoint", str(checkpoint)]
    one_line_error(capsys, [*serve, "--prompt-lookup", "4", "--draft", str(checkpoint)], "choose one")
    one_line_error(capsys, [*serve, "--draft-tokens", "3"], "--draft-tokens goes with --draft")
    one_line_error(capsys, [*serve, "--prompt-lookup", "0"], "prompt lookup needs k >= 1")
    one_line_error(capsys, [*serve, "--draft", str(chat_base)], "needs the same tokenizer")
    choice = tmp_path / "choice.jsonl"
    choice.write_text(json.dumps({"question": "the cat", "choices": ["sat", "ate"], "answer_index": 0}) + "\n")
    one_line_error(capsys, ["eval", "--checkpoint", str(checkpoint), "--task", str(choice), "--prompt-lookup", "4"],
                   "choice task, scored by log-likelihood")
    one_line_error(capsys, ["eval", "--checkpoint", str(checkpoint), "--task", str(choice), "--draft-tokens", "2"],
                   "--draft-tokens goes with --draft")


def test_eval_with_prompt_lookup_or_a_draft_gives_the_plain_answers_and_scores(checkpoint, noisy_draft, tmp_path,
                                                                                capsys):
    """A generation task whose prompts repeat themselves (so lookup drafts), eight items in one batch of plain
    decoding: every item's output, prediction and scores are the same with a drafter."""
    sentences = ["the cat sat on the mat.", "the dog ate the bone.", "héllo wörld.", "the cat ate the bone."]
    items = [{"prompt": f"{a} {b} {a} {b[:9]}", "answer": b} for a in sentences for b in sentences[:2]]
    task = tmp_path / "copy.jsonl"
    task.write_text("".join(json.dumps(item) + "\n" for item in items))
    common = ["eval", "--checkpoint", str(checkpoint), "--task", str(task), "--max-new-tokens", "12"]
    runs = {}
    for name, extra in [("plain", []), ("lookup", ["--prompt-lookup", "3"]),
                        ("draft", ["--draft", str(noisy_draft), "--draft-tokens", "2"])]:
        assert main([*common, *extra, "--out", str(tmp_path / f"{name}.json")]) == 0
        err = capsys.readouterr().err
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert ("speculative decoding:" in err) == (name != "plain")
    fields = ["input", "output", "prediction", "exact_match", "f1", "confidence"]
    expected = [{k: s[k] for k in fields} for s in runs["plain"]["samples"]]
    for name in ("lookup", "draft"):
        assert [{k: s[k] for k in fields} for s in runs[name]["samples"]] == expected
        assert runs[name]["metrics"] == runs["plain"]["metrics"]
        figures = runs[name]["speculative_decoding"]
        assert figures["drafted"] > 0 and figures["verifications"] < figures["generated"]
    assert "speculative_decoding" not in runs["plain"]
