"""Continuous batching: rows that join a running batch late, leave early, or sample with their own
seed produce exactly the tokens the engine gives each of them alone (itself checked against
transformers in test_generate.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import sharp_hf_model

from lmforge.checkpoint import load_model
from lmforge.generate.continuous import DecodeBatch
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=20, temperature=0)
# (step at which the prompt joins, prompt): the third is longer than the batch so far, so the
# running rows must be shifted right to make room for it.
ARRIVALS = [(0, [5, 6, 7]), (3, [20, 21, 22, 23, 24]), (5, list(range(40, 70))), (5, [9]), (12, [11, 12, 13, 14])]


def run(batch: DecodeBatch, arrivals, params: SamplingParams, *, cancel: dict[int, int] | None = None):
    """Drive `batch` step by step, joining prompts when their step comes; returns each row's tokens."""
    outputs: dict[int, list[int]] = {i: [] for i in range(len(arrivals))}
    cancel = cancel or {}
    step = 0
    while step == 0 or len(batch) or any(s >= step for s, _ in arrivals):
        for row, token in batch.step():
            outputs[row.tag].append(token)
        for i, (at, prompt) in enumerate(arrivals):
            if at == step:
                for row, token in batch.join([prompt], params, tags=[i]):
                    outputs[row.tag].append(token)
        leaving = [row for row in batch.rows if cancel.get(row.tag) == step]
        batch.leave(leaving)
        if batch.cache is not None:  # trimmed: no longer than the longest live row
            longest = max(row.prompt_tokens + row.generated for row in batch.rows)
            assert batch.cache.length <= longest
        step += 1
    return outputs


@pytest.mark.parametrize("family", ["llama", "qwen2-sliding", "gpt2", "gemma3", "bloom"])  # bloom: ALiBi over shifted rows
def test_late_joiners_match_running_alone(family, tmp_path):
    hf = sharp_hf_model(family)
    hf.save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path))
    alone = [engine.generate([prompt], GREEDY)[0] for _, prompt in ARRIVALS]
    outputs = run(DecodeBatch(engine), ARRIVALS, GREEDY)
    assert [outputs[i] for i in range(len(ARRIVALS))] == alone
    assert engine.stats.max_batch_size >= 3


def test_longrope_row_matches_transformers(tmp_path):
    """A LongRoPE row decoding past the original context (32) recomputes its cache there, as transformers does."""
    from test_generate import hf_greedy

    hf = sharp_hf_model("phi3-longrope")
    hf.save_pretrained(tmp_path)
    batch = DecodeBatch(Engine(load_model(tmp_path)))
    prompt = list(range(20, 32))  # decodes 24 tokens; without the recomputation the last ones differ
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[hf.generation_config.eos_token_id])
    tokens = [token for _, token in batch.join([prompt], params)]
    while len(batch):
        tokens += [token for _, token in batch.step()]
    assert tokens == hf_greedy(hf, prompt, 24) and len(tokens) > 32 - len(prompt)


def test_rows_leaving_early_do_not_disturb_the_rest(tmp_path):
    sharp_hf_model("llama").save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path))
    alone = [engine.generate([prompt], GREEDY)[0] for _, prompt in ARRIVALS]
    outputs = run(DecodeBatch(engine), ARRIVALS, GREEDY, cancel={0: 4, 2: 8})
    for i, tokens in outputs.items():
        assert tokens == alone[i][: len(tokens)]
    assert len(outputs[0]) < 20 and len(outputs[2]) < 20
    assert all(len(outputs[i]) == 20 for i in (1, 3, 4))


def test_stop_tokens_and_context_end_finish_rows(tmp_path):
    sharp_hf_model("llama").save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path))
    context = engine.config.max_position_embeddings
    free = engine.generate([[5, 6, 7]], GREEDY)[0]
    stop = free[4]
    batch = DecodeBatch(engine)
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[stop])
    rows = [row for row, _ in batch.join([[5, 6, 7]], params)]
    edge = [row for row, _ in batch.join([[i % 50 + 1 for i in range(context - 3)]], GREEDY)]
    while len(batch):
        batch.step()
    assert rows[0].finish == "stop" and rows[0].generated == free.index(stop) + 1
    assert edge[0].finish == "length" and edge[0].generated == 3  # the context holds 3 more tokens
    assert batch.cache is None


def test_seeded_group_samples_as_if_alone(tmp_path):
    sharp_hf_model("llama").save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path))
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, seed=11)
    prompts = [[5, 6, 7], [8, 9]]
    alone = engine.generate(prompts, seeded)

    batch = DecodeBatch(engine)
    outputs: dict[int, list[int]] = {0: [], 1: []}
    batch.join([[30, 31, 32, 33]], SamplingParams(max_new_tokens=30, temperature=0.8), tags=["noise"])
    batch.step()
    for row, token in batch.join(prompts, seeded, tags=[0, 1]):
        outputs[row.tag].append(token)
    while any(row.tag != "noise" for row in batch.rows):
        for row, token in batch.step():
            if row.tag != "noise":
                outputs[row.tag].append(token)
    assert [outputs[0], outputs[1]] == alone


def test_kv_cache_stack_right_aligns_rows():
    from lmforge.kv_cache import KVCache
    from lmforge.presets import PRESETS

    config = PRESETS["micro"]
    a = KVCache(config, 1, 8, dtype=torch.float32, device="cpu")
    b = KVCache(config, 2, 4, dtype=torch.float32, device="cpu")
    a.k.fill_(1.0), b.k.fill_(2.0)
    a.length, b.length = 5, 3
    merged, shift_a, shift_b = KVCache.stack(a, b)
    assert (shift_a, shift_b, merged.length) == (0, 2, 5)
    assert merged.k.shape[1] == 3 and merged.max_len >= 5 + 3
    assert torch.all(merged.k[:, 0, :, :5] == 1) and torch.all(merged.k[:, 1:, :, 2:5] == 2)
    assert torch.all(merged.k[:, 1:, :, :2] == 0)
