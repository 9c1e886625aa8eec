"""Tests for lmforge.data.sampling: the order sampler, sharding a batch, the holdout split, resumable sources."""

import json

import numpy as np
import pytest

from lmforge.data.sampling import OrderSampler, SampledSource, holdout_split, shard


def take(batches: OrderSampler, n: int) -> list[list[int]]:
    return [batches.next() for _ in range(n)]


def test_order_sampler_seeded_permutation_per_epoch():
    run = take(OrderSampler(10, 3, seed=0), 12)  # 3 batches per epoch, one sample dropped each epoch
    assert run == take(OrderSampler(10, 3, seed=0), 12)
    assert run != take(OrderSampler(10, 3, seed=1), 12)
    epochs = [sum(run[e * 3 : e * 3 + 3], []) for e in range(4)]
    for epoch in epochs:
        assert len(epoch) == len(set(epoch)) == 9 and set(epoch) <= set(range(10))
    assert len({tuple(e) for e in epochs}) == 4
    assert epochs[1] == np.random.default_rng(1).permutation(10)[:9].tolist()  # epoch e is seeded by seed + e
    assert list(zip(range(3), OrderSampler(10, 3))) == list(zip(range(3), run))  # also an iterator


def test_order_sampler_resume_reproduces_the_uninterrupted_run():
    uninterrupted = take(OrderSampler(10, 3, seed=5), 12)
    for k in range(13):
        first = OrderSampler(10, 3, seed=5)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        assert state == {"epoch": k // 3, "position": k % 3}
        resumed = OrderSampler(10, 3, seed=5)
        resumed.load_state_dict(state)
        assert take(resumed, 12 - k) == uninterrupted[k:], f"resuming after {k} batches"
    with pytest.raises(ValueError, match="3 batches"):
        OrderSampler(10, 3).load_state_dict({"epoch": 0, "position": 3})
    with pytest.raises(ValueError, match="2 samples"):
        OrderSampler(2, 3)


def test_shard_contiguous_parts():
    batch = list(range(100, 112))
    parts = [shard(batch, rank, 2, micro, 3) for rank in range(2) for micro in range(3)]
    assert sum(parts, []) == batch and all(len(p) == 2 for p in parts)
    assert shard(batch, 1, 2, 2, 3) == [110, 111]
    assert shard(batch, 0, 1, 0, 1) == batch
    with pytest.raises(ValueError, match="does not split"):
        shard(batch, 0, 5, 0, 1)


def test_holdout_split_is_seeded_and_keeps_the_training_order():
    items = list(range(100, 120))
    kept, held = holdout_split(items, 0.25, seed=3)
    order = np.random.default_rng(3).permutation(20)
    assert held == [items[i] for i in order[:5]]
    assert kept == [x for x in items if x not in held]  # original order
    assert holdout_split(items, 0.25, seed=3) == (kept, held)
    assert holdout_split(items, 0.0, seed=3) == (items, [])


def test_sampled_source_resumes_where_it_stopped():
    source = SampledSource(10, lambda rows: {"rows": rows}, 3, seed=1)
    for _ in range(4):
        source.next_batch()
    state = json.loads(json.dumps(source.state_dict()))
    expected = [source.next_batch()["rows"] for _ in range(5)]
    resumed = SampledSource(10, lambda rows: {"rows": rows}, 3, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["rows"] for _ in range(5)] == expected
