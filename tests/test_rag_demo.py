"""The demo's retrieval stage, measured: on facts pretraining never saw (people absent from it,
employers changed after it) exact match rises from near zero closed-book to high with the context
store, and on two-hop questions the ReAct agent beats one retrieval. The model is the demo's
architecture pretrained on the demo's world for fewer steps; the stage is the demo's own
(`retrieval_stage`: store, tuning recipe, held-out questions)."""

from __future__ import annotations

import pytest
import torch

from lmforge.demo.pretraining import DEMO_MODEL, VARIANTS
from lmforge.demo.retrieval import Retrieval, retrieval_stage
from lmforge.rag.evaluate import exact_match_rate
from lmforge.tokenizer import train_tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.pretrain import DataConfig, ModelSpec, PretrainConfig, pretrain
from lmforge.world.documents import write_instruction_data, write_pretraining_corpus
from lmforge.world.people import make_world
from lmforge.world.safety import write_safety_data

PRETRAIN_STEPS, TUNING_STEPS = 400, 800

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Retrieval:
    out = tmp_path_factory.mktemp("rag-demo")
    world = make_world(0, n_people=100, n_companies=10)
    corpus = write_pretraining_corpus(world, out / "world" / "corpus.jsonl", variants=VARIANTS)
    train_tokenizer([corpus], 2048, out / "tokenizer", show_progress=False)
    write_instruction_data(world, out / "world" / "sft.jsonl", "train", phrasings=2)
    write_safety_data(world, out / "world" / "safety-sft.jsonl", "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the one test here that trains for minutes: use both cores
    try:
        model = pretrain(PretrainConfig(
            out_dir=out / "pretrain", model=ModelSpec(preset="micro", overrides=DEMO_MODEL),
            data=DataConfig(paths=[corpus], tokenizer=out / "tokenizer", seq_len=128, val_fraction=0.05),
            train=TrainConfig(steps=PRETRAIN_STEPS, micro_batch_size=16, lr=3e-3, warmup_steps=30, log_every=50,
                              eval_every=PRETRAIN_STEPS, save_every=PRETRAIN_STEPS)))
        return retrieval_stage(out, world, model, 0, TUNING_STEPS)
    finally:
        torch.set_num_threads(threads)


def test_retrieval_lifts_exact_match_on_facts_pretraining_never_saw(stage):
    g = stage.grounding
    print(f"exact match {g.closed_book_em:.0%} closed-book -> {g.grounded_em:.0%} with retrieval "
          f"(cites the right source {g.cites_gold:.0%}) on {len(stage.questions)} questions")
    assert {q.kind for q in stage.questions} == {"absent", "changed"}
    # Measured with retrieval: 40% from 3% closed-book (ATEN_CPU_CAPABILITY=default), 57% from 9% (avx2),
    # 43% on an AMD AVX-512 CPU; a level of 45% held on some kernels only. The lift holds with room.
    assert g.closed_book_em <= 0.15
    assert g.grounded_em >= g.closed_book_em + 0.25
    # An exact answer comes from the source it cites, not from memory.
    right = [(a, q) for a, q in zip(g.grounded, stage.questions) if exact_match_rate([a.answer], [q.question.answer]) == 1]
    assert sum(any(h.doc_id == q.doc_id for h in a.cited()) for a, q in right) >= 0.9 * len(right)


def test_the_agent_answers_more_two_hop_questions_than_one_retrieval(stage):
    hops = stage.multihop
    print(f"two-hop exact match: one retrieval {hops.single_em:.0%}, two {hops.iterative_em:.0%}, "
          f"agent {hops.agent_em:.0%}")
    assert hops.agent_em >= hops.single_em + 0.1
    assert hops.agent_em > hops.iterative_em
    # Its right answers came from the store: the answer's sentence was among the observations (the
    # first hop may come from memory, for people pretraining knew and employers that did not change).
    solved = [(t, q) for t, q in zip(hops.agent, stage.hop_questions) if exact_match_rate([t.answer or ""], [q.answer]) == 1]
    looked_up = [any(m["role"] == "user" and q.hops[-1].fact in m["content"] for m in t.messages[1:])
                 for t, q in solved]
    assert sum(looked_up) > 0.5 * len(solved)  # measured: 5 of 7 with default kernels
