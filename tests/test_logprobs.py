"""Log-probs, echo and the sampling parameters users send: the pure processing functions against hand
computations, and the served values (official `openai` client) against a teacher-forced forward pass."""

from __future__ import annotations

import math

import pytest
import torch
from live_server import LiveServer, make_chat_checkpoint

from lmforge.generate.engine import Engine
from lmforge.generate.processing import (
    RowState, apply_logit_bias, apply_penalties, apply_repetition_penalty, process, token_counts,
)
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import token_bytes

openai = pytest.importorskip("openai")
from lmforge.serve.server import create_app  # noqa: E402

MODEL = "tiny"
TOL = 1e-4


# ---- pure functions against hand computations ------------------------------------------------------------


def test_penalties_and_bias_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0]])
    counts = token_counts([[0, 0, 3], [2]], 4)
    assert counts.tolist() == [[2, 0, 0, 1], [0, 0, 1, 0]]
    out = apply_penalties(logits, counts, presence=torch.tensor([0.5, 1.0]), frequency=torch.tensor([0.25, -0.5]))
    assert out.tolist() == [[2.0 - 0.5 - 0.5, -1.0, 0.5, 3.0 - 0.25 - 0.5], [1.0, 1.0, -2.0 + 0.5 - 1.0, 0.0]]
    seen = torch.tensor([[True, True, False, False], [False, False, True, True]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 1.5]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [1.0, 1.0, -3.0, 0.0]]
    out = apply_logit_bias(logits, [{1: 100.0, 3: -1.5}, {}])
    assert out.tolist() == [[2.0, 99.0, 0.5, 1.5], [1.0, 1.0, -2.0, 0.0]]


def test_process_applies_each_rows_own_settings():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    states = [RowState(SamplingParams(min_tokens=2, stop_token_ids=(3,), logit_bias={0: 1.0}), tokens=[1]),
              RowState(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), prompt=[0], tokens=[2, 2]),
              RowState(SamplingParams())]
    out = process(logits, states, None)
    # row 0: stop token 3 masked (1 of 2 tokens so far), then +1 on token 0
    # row 1: 0 and 2 seen (1.0 / 2, -2.0 * 2), then frequency 2 x 1.0 on token 2
    assert out.tolist() == [[3.0, -1.0, 0.5, -math.inf], [0.5, 1.0, -6.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    plain = [RowState(SamplingParams()), RowState(SamplingParams(temperature=0.5))]
    assert process(logits, plain + plain[:1], None) is logits  # nothing to do: no copy, no work


# ---- served values against the model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def oracle(checkpoint):
    return Session.load(checkpoint)


@pytest.fixture(scope="module")
def client(checkpoint):
    with LiveServer(create_app(Session.load(checkpoint), model_name=MODEL)) as live:
        yield openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def teacher_forced(session: Session, ids: list[int]) -> torch.Tensor:
    """Log-softmax (T, V) of the model's logits over `ids` in one forward pass, no cache."""
    with torch.no_grad():
        return session.model(torch.tensor([ids]))[0].float().log_softmax(-1)


def greedy_ids(session: Session, prompt: list[int], n: int) -> list[int]:
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=tuple(session.stop_token_ids))
    ids = Engine(session.model).generate([prompt], params)[0]
    return [t for t in ids if t not in session.stop_token_ids]


def check_top(entries, row: torch.Tensor, n: int, text) -> None:
    best = row.topk(n)
    assert [text(t) for t in best.indices.tolist()] == [e[0] for e in entries]
    assert all(abs(lp - e[1]) < TOL for lp, e in zip(best.values.tolist(), entries))


def test_chat_logprobs_equal_teacher_forced(client, oracle):
    messages = [{"role": "user", "content": "the cat"}]
    prompt = oracle.chat_prompt(messages)
    ids = greedy_ids(oracle, prompt, 12)
    lp = teacher_forced(oracle, prompt + ids)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    text = lambda t: oracle.tokenizer.decode([t])  # noqa: E731
    assert [c.token for c in content] == [text(t) for t in ids]
    for j, (c, t) in enumerate(zip(content, ids)):
        row = lp[len(prompt) + j - 1]
        assert abs(c.logprob - float(row[t])) < TOL
        assert bytes(c.bytes) == token_bytes(oracle.tokenizer, t)
        check_top([(x.token, x.logprob) for x in c.top_logprobs], row, 3, text)
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == out.choices[0].message.content

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [x for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for x in chunk.choices[0].logprobs.content]
    assert [(x.token, x.logprob) for x in streamed] == [(c.token, c.logprob) for c in content]


def test_completion_echo_scores_the_prompt(client, oracle):
    """lm-eval's `local-completions` loglikelihood request: echo, max_tokens=0, logprobs=1."""
    prompt = oracle.encode("the cat sat on the mat")
    lp = teacher_forced(oracle, prompt)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    got = out.choices[0].logprobs
    assert out.choices[0].text == oracle.tokenizer.decode(prompt, skip_special_tokens=True)
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert len(got.tokens) == len(prompt) and out.usage.completion_tokens == 0
    for i in range(1, len(prompt)):
        assert abs(got.token_logprobs[i] - float(lp[i - 1, prompt[i]])) < TOL
        best = int(lp[i - 1].argmax())
        assert abs(got.top_logprobs[i][oracle.tokenizer.decode([best])] - float(lp[i - 1, best])) < TOL
    text = "".join(got.tokens)
    assert got.text_offset == [len("".join(got.tokens[:i])) for i in range(len(prompt))] and text


def test_completion_logprobs_echo_and_generation_streamed(client, oracle):
    prompt = oracle.encode("the dog")
    ids = greedy_ids(oracle, prompt, 6)
    lp = teacher_forced(oracle, prompt + ids)
    body = dict(model=MODEL, prompt="the dog", max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**body).choices[0]
    expected = [None] + [float(lp[i - 1, t]) for i, t in enumerate(prompt + ids) if i]
    assert len(whole.logprobs.token_logprobs) == len(expected)
    assert all((a is None and b is None) or abs(a - b) < TOL for a, b in zip(whole.logprobs.token_logprobs, expected))
    assert whole.text.startswith(oracle.tokenizer.decode(prompt, skip_special_tokens=True))
    chunks = list(client.completions.create(**body, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs
    offsets = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


def test_logit_bias_forces_a_token_and_penalties_change_greedy(client, oracle):
    token = oracle.encode(" cat")[-1]
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the dog"}],
                                         max_tokens=5, temperature=1.0, seed=0, logit_bias={str(token): 100})
    assert out.choices[0].message.content == oracle.tokenizer.decode([token] * 5)
    plain = client.completions.create(model=MODEL, prompt="the", max_tokens=20, temperature=0).choices[0].text
    fresh = client.completions.create(model=MODEL, prompt="the", max_tokens=20, temperature=0,
                                      presence_penalty=2.0, frequency_penalty=2.0).choices[0].text
    assert plain.endswith("he" * 6)  # greedy falls into a loop of one token...
    assert "he" * 3 not in fresh and len(set(fresh)) > len(set(plain))  # ...that the penalties break


def test_min_tokens_masks_the_end(client, oracle):
    token = oracle.stop_token_ids[0]
    out = client.completions.create(model=MODEL, prompt="the", max_tokens=8, temperature=0,
                                    logit_bias={str(token): 100}, extra_body={"min_tokens": 4})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 5


def test_echo_without_logprobs_prefixes_the_prompt(client):
    whole = client.completions.create(model=MODEL, prompt="the dog", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt="the dog", max_tokens=3, temperature=0)
    assert whole.choices[0].text == "the dog" + plain.choices[0].text and whole.choices[0].logprobs is None
    chunks = list(client.completions.create(model=MODEL, prompt="the dog", max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
