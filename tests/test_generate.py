"""Sampling filters, the engine, text streaming and the generate/chat commands, against transformers."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import sharp_hf_model
from hf_models import tiny_hf_model

from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams, sample, top_k_filter, top_p_filter
from lmforge.generate.session import Session
from lmforge.generate.text import Detokenizer, complete
from lmforge.model import fuse_projections
from lmforge.tokenizer import train_tokenizer

NEG = float("-inf")
TOKENIZER_VOCAB = 300
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]]


# ---- filters: hand-computed cases and transformers' logits processors --------------------------


def test_top_k_hand_case():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0], [0.0, -1.0, 4.0, 4.0]])
    expected = torch.tensor([[NEG, 3.0, NEG, 5.0], [NEG, NEG, 4.0, 4.0]])
    assert torch.equal(top_k_filter(logits, 2), expected)
    assert torch.equal(top_k_filter(logits, None), logits)


@pytest.mark.parametrize(
    "p, kept",
    [(0.5, [0.5]), (0.51, [0.5, 0.3]), (0.79, [0.5, 0.3]), (0.81, [0.5, 0.3, 0.15]), (0.99, [0.5, 0.3, 0.15, 0.05]),
     (0.01, [0.5])],
)
def test_top_p_hand_case(p, kept):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # unsorted, so the filter must sort
    out = top_p_filter(probs.log()[None], p)[0]
    assert sorted(probs[out != NEG].tolist(), reverse=True) == pytest.approx(kept)
    assert torch.equal(out[out != NEG], probs.log()[out != NEG])


def test_filters_match_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(16, 50) * 3
    for k in (1, 5, 20):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


def test_sample_greedy_and_seeded():
    logits = torch.randn(4, 30)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    draw = lambda: sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(), draw())
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, temperature=-1)


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(20000, 5)
    draws = sample(logits, temperature=0.5, top_k=3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 0.5, -1)
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], expected, atol=0.015)


# ---- the engine against transformers' generate --------------------------------------------------


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, up to and including its EOS (where it stops)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def hf_greedy_batch(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy tokens for `prompts` left-padded into one batch (with their attention mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()  # prompts hold no token 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    eos = model.generation_config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in out[:, width:].tolist()]


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "qwen2", "gpt2", "gemma", "gemma2", "gemma3", "qwen3",
                                    "qwen3_moe", "phi3", "falcon", "falcon-new", "bloom"])
def test_greedy_matches_transformers_and_batching(family, tmp_path):
    hf = sharp_hf_model(family)
    hf.save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path))
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[hf.generation_config.eos_token_id])
    batched = engine.generate(PROMPTS, params)
    for prompt, tokens in zip(PROMPTS, batched):
        assert tokens == hf_greedy(hf, prompt, 24)
        assert engine.generate([prompt], params)[0] == tokens
    assert engine.stats.max_batch_size == len(PROMPTS)


@pytest.mark.parametrize("family", ["phi3-longrope", "falcon-new", "bloom"])
def test_greedy_batch_matches_transformers_left_padded_batch(family, tmp_path):
    """The engine's left-padded batch against transformers' own: ALiBi counts positions from each row's
    first token; LongRoPE picks one factor set per forward pass for the whole batch (here the longest row
    passes the original 32 positions while the others do not), so only the batched tokens can be compared."""
    hf = sharp_hf_model(family)
    hf.save_pretrained(tmp_path)
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[hf.generation_config.eos_token_id])
    assert Engine(load_model(tmp_path)).generate(PROMPTS, params) == hf_greedy_batch(hf, PROMPTS, 24)


def test_stop_token_ends_only_its_row(tmp_path):
    hf = sharp_hf_model("llama")
    hf.save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path))
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0))
    stop = free[0][3]
    stopped = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[stop]))
    for full, cut in zip(free, stopped):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert cut == expected


def test_seeded_sampling_is_reproducible(tmp_path):
    sharp_hf_model("llama").save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path))
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert engine.generate(PROMPTS, params) == engine.generate(PROMPTS, params)
    other = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=8)
    assert engine.generate(PROMPTS, params) != engine.generate(PROMPTS, other)


def test_prompt_limits(tmp_path):
    sharp_hf_model("llama").save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path))
    context = engine.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"{context} tokens"):
        engine.generate([[3] * context], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], SamplingParams(max_new_tokens=4))
    near_end = engine.generate([[3] * (context - 5)], SamplingParams(max_new_tokens=50, temperature=0))
    assert len(near_end[0]) == 5  # stops at the context's end instead of overflowing the cache
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# ---- text: detokenizing, stop strings, the CLI ---------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog ate the bone. héllo wörld 👋 日本語\n" * 30)
    return train_tokenizer([corpus], TOKENIZER_VOCAB, tmp_path_factory.mktemp("tok"), show_progress=False)


def test_detokenizer_holds_back_partial_characters_and_stop_prefixes(tokenizer):
    ids = tokenizer.encode("hi 👋 there. END more")
    detok = Detokenizer(tokenizer, stop=["END"])
    deltas = [detok.push(i) for i in ids]
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + detok.flush() == "hi 👋 there. "
    assert detok.stopped
    plain = Detokenizer(tokenizer)
    text = "".join(plain.push(i) for i in tokenizer.encode("héllo 日本語")) + plain.flush()
    assert text == "héllo 日本語"


def test_stop_strings_wait_for_min_tokens(tokenizer):
    """vLLM's `min_tokens`: a stop string inside the first `min_tokens` tokens does not end the text; one after does."""
    ids = tokenizer.encode("the cat. the dog. the bone.")
    first_stop = next(n for n in range(1, len(ids) + 1) if "." in tokenizer.decode(ids[:n]))
    held = Detokenizer(tokenizer, stop=["."], min_tokens=first_stop + 1)
    text = "".join(held.push(i) for i in ids) + held.flush()
    assert held.stopped and text == "the cat. the dog"
    eager = Detokenizer(tokenizer, stop=["."])
    assert "".join(eager.push(i) for i in ids) + eager.flush() == "the cat"


def checkpoint_with_tokenizer(tokenizer, path):
    hf = tiny_hf_model("llama", vocab_size=TOKENIZER_VOCAB)
    hf.config.eos_token_id = tokenizer.eos_id
    hf.generation_config.eos_token_id = tokenizer.eos_id
    hf.save_pretrained(path)
    tokenizer.save(path)
    return hf


def test_complete_reports_finish_reasons(tokenizer, tmp_path):
    hf = checkpoint_with_tokenizer(tokenizer, tmp_path)
    session = Session.load(tmp_path)
    prompt = tokenizer.encode("the cat")
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[tokenizer.eos_id])
    free = complete(session.engine, tokenizer, [prompt], params)[0]
    assert free.prompt_tokens == len(prompt)
    expected = hf_greedy(hf, prompt, 12)
    assert free.finish_reason == ("stop" if expected[-1] == tokenizer.eos_id else "length")
    expected = [t for t in expected if t != tokenizer.eos_id]
    assert free.token_ids == expected
    assert free.text == tokenizer.decode(expected, skip_special_tokens=True)
    stop = free.text[len(free.text) // 2 :][:2]
    if stop.strip():
        cut = complete(session.engine, tokenizer, [prompt], params, [stop])[0]
        assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]


def test_generate_command_matches_transformers(tokenizer, tmp_path, capsys):
    hf = checkpoint_with_tokenizer(tokenizer, tmp_path)
    prompt = "the dog"
    code = main(["generate", "--checkpoint", str(tmp_path), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", "15"])
    assert code == 0
    ids = tokenizer.encode(prompt)
    expected = [t for t in hf_greedy(hf, ids, 15) if t != tokenizer.eos_id]
    assert capsys.readouterr().out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"


def test_generate_command_bad_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_chat_loop_keeps_history_within_context(tokenizer, tmp_path):
    checkpoint_with_tokenizer(tokenizer, tmp_path)
    session = Session.load(tmp_path)
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[tokenizer.eos_id])
    out = io.StringIO()
    session.chat_loop(params, system="be brief", read=io.StringIO("the cat\n/reset\nthe dog\n"), write=out)
    replies = out.getvalue().splitlines()
    first = session.chat_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}])
    assert replies[0] == "".join(session.stream(first, params))
    long_history = [{"role": "system", "content": "be brief"}]
    long_history += [{"role": r, "content": "the cat sat on the mat " * 3} for r in ["user", "assistant"] * 20]
    long_history.append({"role": "user", "content": "last"})
    ids = session.chat_prompt(long_history, reserve=16)
    assert len(ids) + 16 <= session.context
    text = tokenizer.decode(ids)
    assert text.count("be brief") == 1 and text.rstrip().endswith("assistant") and "last" in text


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)  # beyond what torch.Generator.manual_seed takes
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams(temprature=0.5)
    assert math.isclose(SamplingParams(temperature=0.5).temperature, 0.5)


# ---- the static cache and the compiled decode step ------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "bloom"])  # bloom: ALiBi over masked unfilled slots
def test_static_cache_equals_growing_cache(family, tmp_path):
    from lmforge.kv_cache import KVCache, StaticKVCache

    sharp_hf_model(family).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(3, 90, (2, 30), generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([0, 4])
    outs = {}
    for kind in (KVCache, StaticKVCache):
        cache = kind(model.config, 2, 64, dtype=torch.float32, device="cpu")
        steps = [model(ids[:, :12], pad=pad, cache=cache)]
        steps += [model(ids[:, i : i + 1], pad=pad, cache=cache) for i in range(12, 30)]
        outs[kind] = torch.cat(steps, dim=1)
    torch.testing.assert_close(outs[StaticKVCache], outs[KVCache], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])  # qkv biases, GeGLU, partial rotary
def test_fused_projections_compute_what_the_separate_ones_do(family, tmp_path):
    sharp_hf_model(family).save_pretrained(tmp_path)
    model, fused = load_model(tmp_path), load_model(tmp_path)
    fuse_projections(fused)
    attention = fused.model.layers[0].self_attn
    assert attention.qkv_proj is not None and not hasattr(attention, "q_proj")
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused(ids), model(ids), atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_new_tokens=20, temperature=0)
    assert Engine(fused).generate(PROMPTS, params) == Engine(model).generate(PROMPTS, params)


@pytest.mark.slow
def test_compiled_fused_engine_matches_eager_without_recompiling(tmp_path):
    sharp_hf_model("mistral").save_pretrained(tmp_path)
    params = SamplingParams(max_new_tokens=20, temperature=0)
    eager = Engine(load_model(tmp_path)).generate(PROMPTS, params)
    model = load_model(tmp_path)
    fuse_projections(model)
    engine = Engine(model, compile=True)
    assert engine.generate(PROMPTS, params) == eager
    with torch._dynamo.config.patch(error_on_recompile=True):  # the same batch size again: the same graph
        assert engine.generate(PROMPTS, params) == eager


def test_a_static_cache_refuses_to_change_its_rows_or_slots():
    """A compiled engine's cache is per-layer tensors of fixed shape: continuous batching's row and slot edits
    are refused with the reason, never half-applied."""
    from lmforge.kv_cache import KVCache, StaticKVCache
    from lmforge.presets import preset

    config = preset("tiny")
    static = StaticKVCache(config, 2, 16, dtype=torch.float32, device="cpu")
    dynamic = KVCache(config, 1, 16, dtype=torch.float32, device="cpu")
    for edit in (lambda: static.keep_rows(torch.tensor([0])), lambda: static.drop_left(1),
                 lambda: KVCache.stack(static, dynamic), lambda: KVCache.stack(dynamic, static)):
        with pytest.raises(TypeError, match="static KV cache"):
            edit()
    assert [tuple(t.shape) for t in static.k] == [(2, config.num_key_value_heads, 16, config.head_dim)] * len(static.k)
