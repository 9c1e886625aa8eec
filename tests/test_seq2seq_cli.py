"""Encoder-decoder models through the commands: `lmforge generate`, `chat`, `serve` (the official `openai`
client) and `eval` on a tiny sharpened T5 with a Unigram tokenizer, against transformers' `generate`, its
teacher-forced log-probs, and `rouge_score` over its generations."""

from __future__ import annotations

import io
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import SHARPEN

from lmforge.cli import main
from lmforge.generate.session import Seq2SeqSession, Session

TEXTS = ["summarize: the quick brown fox jumps over the lazy dog", "translate: a dog sleeps in the sun",
         'answer in json: {"answer": "yes", "score": 3}', "question: where does the cat sleep today"]
# Inputs of different lengths; transformers' greedy replies to the first and third end at `</s>` (after 6 and 3
# tokens), the others run to MAX_NEW.
PROMPTS = ["sleeps json summarize answer cat dog jumps", "answer quick lazy the question dog", "does the a in dog",
           "json fox does cat sun where"]
MAX_NEW = 16
EOS_BOOST = 2.0


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A T5 directory as transformers saves it: a v1.0 model (relu, tied head) over a Unigram tokenizer's
    vocabulary (words and characters of TEXTS) with `</s>` appended by the post-processor, its matrices
    sharpened as conftest's."""
    import transformers as tf
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors

    from lmforge.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("t5-cli")
    words = sorted({w for text in TEXTS for w in text.split()})
    chars = sorted({c for text in TEXTS for c in text if c != " "})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]  # a fixed vocabulary, no training
    pieces += [("\u2581" + w, -5.0) for w in words] + [(c, -8.0) for c in chars]
    backend = Backend(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    Tokenizer(backend, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                        "tokenizer_class": "T5TokenizerFast", "extra_ids": 0,
                        "clean_up_tokenization_spaces": False}).save(path)
    torch.manual_seed(0)
    hf = tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=backend.get_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
        hf.shared.weight[1] *= EOS_BOOST  # `</s>` within reach, so that some replies end before the limit
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def oracle(t5_dir):
    """transformers' model and tokenizer over the directory."""
    import transformers as tf

    return tf.T5ForConditionalGeneration.from_pretrained(t5_dir).eval(), tf.AutoTokenizer.from_pretrained(t5_dir)


def hf_generate(oracle, text: str, max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy reply to one input: its tokens after the decoder-start token, with the final `</s>`."""
    model, tokenizer = oracle
    ids = torch.tensor([tokenizer(text).input_ids])
    out = model.generate(input_ids=ids, max_new_tokens=max_new, num_beams=1, do_sample=False)[0, 1:].tolist()
    return out[: out.index(1) + 1] if 1 in out else out


def hf_text(oracle, text: str, max_new: int = MAX_NEW) -> str:
    return oracle[1].decode(hf_generate(oracle, text, max_new), skip_special_tokens=True)


def test_session_load_dispatches_to_seq2seq(t5_dir, oracle):
    session = Session.load(t5_dir)
    assert isinstance(session, Seq2SeqSession) and session.encoder_decoder
    assert session.encode(PROMPTS[0]) == oracle[1](PROMPTS[0]).input_ids  # `</s>` appended
    replies = [hf_text(oracle, p) for p in PROMPTS]
    assert [len(hf_generate(oracle, p)) for p in PROMPTS] == [6, MAX_NEW, 3, MAX_NEW]  # the oracle's, as chosen
    assert session.replies([[{"role": "user", "content": p}] for p in PROMPTS], session.greedy(MAX_NEW)) == \
        [r.strip() for r in replies]
    with pytest.raises(ValueError, match="compile applies to decoder-only"):
        Session.load(t5_dir, compile=True)


def test_generate_command_matches_transformers(t5_dir, oracle, capsys):
    for prompt in PROMPTS[:2]:
        code = main(["generate", "--checkpoint", str(t5_dir), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", str(MAX_NEW)])
        assert code == 0 and capsys.readouterr().out == hf_text(oracle, prompt) + "\n"
    want = hf_text(oracle, PROMPTS[1])
    stop = want[3:5]  # cut at the first occurrence of a piece of the reply
    main(["generate", "--checkpoint", str(t5_dir), "--prompt", PROMPTS[1], "--temperature", "0", "--max-new-tokens",
          str(MAX_NEW), "--stop", stop])
    assert capsys.readouterr().out == want[: want.index(stop)] + "\n"
    args = ["generate", "--checkpoint", str(t5_dir), "--prompt", PROMPTS[2], "--temperature", "1.5", "--top-k", "5",
            "--seed", "7", "--max-new-tokens", str(MAX_NEW)]
    main(args)
    sampled = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == sampled  # seeded sampling repeats
    assert main(["generate", "--checkpoint", str(t5_dir), "--prompt", "x", "--compile"]) == 2
    assert "compile applies to decoder-only models" in capsys.readouterr().err


def test_generate_json_schema(t5_dir, tmp_path, capsys):
    import jsonschema

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"enum": [1, 2, 3]}},
              "required": ["answer", "score"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    main(["generate", "--checkpoint", str(t5_dir), "--prompt", PROMPTS[0], "--temperature", "0",
          "--max-new-tokens", "40", "--json-schema", str(tmp_path / "schema.json")])
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)


def test_chat_takes_each_line_as_the_whole_input(t5_dir, oracle, monkeypatch, capsys):
    """No chat template and no history: each reply is transformers' reply to that line alone."""
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(PROMPTS[:3]) + "\n/reset\n" + PROMPTS[0] + "\n"))
    assert main(["chat", "--checkpoint", str(t5_dir), "--temperature", "0", "--max-new-tokens", str(MAX_NEW)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [hf_text(oracle, p).strip() for p in [*PROMPTS[:3], PROMPTS[0]]]
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[0] + "\n"))
    assert main(["chat", "--checkpoint", str(t5_dir), "--system", "be brief"]) == 2
    assert "no chat template" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(t5_dir):
    from live_server import LiveServer

    from lmforge.serve.server import create_app

    session = Session.load(t5_dir)
    with LiveServer(create_app(session, model_name="t5")) as live:
        live.session = session
        yield live


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def teacher_forced_logprobs(oracle, text: str, reply: list[int]) -> list[float]:
    """transformers' log-prob of each reply token given the input and the tokens before it."""
    model, tokenizer = oracle
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokenizer(text).input_ids]), decoder_input_ids=torch.tensor([[0] +
                       reply[:-1]])).logits[0]
    return logits.log_softmax(-1).gather(1, torch.tensor(reply)[:, None])[:, 0].tolist()


def test_server_completions_and_chat_match_transformers(client, oracle):
    for prompt in PROMPTS[:2]:
        want, reason = hf_text(oracle, prompt), "stop" if hf_generate(oracle, prompt)[-1] == 1 else "length"
        done = client.completions.create(model="t5", prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        assert (done.choices[0].text, done.choices[0].finish_reason) == (want, reason)
        stream = client.completions.create(model="t5", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want
        history = [{"role": "user", "content": "an earlier turn"}, {"role": "assistant", "content": "ignored"},
                   {"role": "user", "content": prompt}]  # the input is the last user message alone
        chat = client.chat.completions.create(model="t5", messages=history, max_tokens=MAX_NEW, temperature=0)
        assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (want, reason)
        stream = client.chat.completions.create(model="t5", messages=history, max_tokens=MAX_NEW, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_server_logprobs_stop_and_concurrency(client, oracle):
    reply = hf_generate(oracle, PROMPTS[0])
    chat = client.chat.completions.create(model="t5", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=MAX_NEW, temperature=0, logprobs=True, top_logprobs=2)
    got = [x.logprob for x in chat.choices[0].logprobs.content]
    want = teacher_forced_logprobs(oracle, PROMPTS[0], reply)[:-1]  # the final `</s>` is no text
    assert got == pytest.approx(want, abs=1e-4)
    text = hf_text(oracle, PROMPTS[1])
    cut = client.completions.create(model="t5", prompt=PROMPTS[1], max_tokens=MAX_NEW, temperature=0, stop=[text[3:5]])
    assert cut.choices[0].text == text[: text.index(text[3:5])] and cut.choices[0].finish_reason == "stop"
    with ThreadPoolExecutor(4) as pool:  # one batch at a time: later requests wait for the running one
        texts = list(pool.map(lambda p: client.completions.create(
            model="t5", prompt=p, max_tokens=MAX_NEW, temperature=0, n=2).choices, PROMPTS))
    assert [[c.text for c in choices] for choices in texts] == [[hf_text(oracle, p)] * 2 for p in PROMPTS]


def test_server_refuses_what_seq2seq_cannot_do(client):
    import openai

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="tools are not supported for an encoder-decoder"):
        client.chat.completions.create(model="t5", messages=[{"role": "user", "content": "x"}], tools=[tool])
    with pytest.raises(openai.BadRequestError, match="answers the last user message"):
        client.chat.completions.create(model="t5", messages=[{"role": "user", "content": "x"},
                                                             {"role": "assistant", "content": "y"}])
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        client.completions.create(model="t5", prompt="x", max_tokens=0, echo=True, logprobs=1)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_generation_task_matches_rouge_of_transformers(t5_dir, oracle, tmp_path, capsys):
    from rouge_score.rouge_scorer import RougeScorer

    replies = [hf_text(oracle, p, 8) for p in PROMPTS]
    answers = [replies[0], "lazy dog", replies[2] + " extra", "sun"]  # one exact, one partly right
    task = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers)])
    assert main(["eval", "--checkpoint", str(t5_dir), "--task", str(task), "--max-new-tokens", "8",
                 "--out", str(tmp_path / "out.json")]) == 0
    got = json.loads((tmp_path / "out.json").read_text())["metrics"]
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(a, r.strip()) for a, r in zip(answers, replies)]
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert got[kind] == pytest.approx(sum(s[kind].fmeasure for s in scores) / len(scores), abs=1e-12)
    assert got["exact_match"] == sum(a.strip() == r.strip() for a, r in zip(answers, replies)) / len(PROMPTS)
    assert got["exact_match"] == 0.25 and 0 < got["rouge1"] < 1
    assert main(["eval", "--checkpoint", str(t5_dir), "--task", str(task), "--chat"]) == 2
    assert "an encoder-decoder model has none" in capsys.readouterr().err


def test_eval_choice_task_scores_decoder_likelihoods(t5_dir, oracle, tmp_path):
    """A choice's score is transformers' log-likelihood of ` choice</s>` as the decoder's target given the question."""
    tokenizer = oracle[1]
    items = [{"question": p, "choices": ["lazy dog", "the sun", "yes"], "answer_index": i % 3}
             for i, p in enumerate(PROMPTS)]
    task = write_jsonl(tmp_path / "mc.jsonl", items)
    assert main(["eval", "--checkpoint", str(t5_dir), "--task", str(task), "--out", str(tmp_path / "mc.json")]) == 0
    results = json.loads((tmp_path / "mc.json").read_text())
    for item, sample in zip(items, results["samples"]):
        want = [sum(teacher_forced_logprobs(oracle, item["question"], tokenizer(" " + c).input_ids))
                for c in item["choices"]]
        # fp32 rounding through the sharpened weights: sums near -35 agree to about 1e-6 of their size
        assert sample["loglikelihoods"] == pytest.approx(want, rel=1e-5)
        assert sample["prediction"] == max(range(3), key=lambda i: want[i])
    assert not math.isnan(results["metrics"]["acc"])
    write_jsonl(tmp_path / "text.jsonl", [{"text": "the lazy dog"}])
    with pytest.raises(ValueError, match="perplexity task: an encoder-decoder model"):
        from lmforge.eval.runner import run_eval

        run_eval(t5_dir, tmp_path / "text.jsonl")
