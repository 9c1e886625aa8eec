"""The demo's retrieval stage: the world's context store; full fine-tuning of the SFT model on grounded
answers and ReAct traces about the training people; and what retrieval changes on facts
pretraining never saw (people absent from it, employers changed after it) and on two-hop
questions (one retrieval, two, or the ReAct agent)."""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.generate.session import Session
from lmforge.peft.method import AdapterConfig
from lmforge.rag.documents import read_documents
from lmforge.rag.evaluate import (
    GroundedResult, MultiHopResult, compare_grounding, compare_multihop, exact_match_rate, recall_at_k,
)
from lmforge.rag.store import Store
from lmforge.train.loop import TrainConfig
from lmforge.train.run_dir import table_cell
from lmforge.train.sft import DatasetSpec, SFTConfig, SFTDataConfig, sft
from lmforge.world.people import World, make_world
from lmforge.world.store import (
    MultiHopQuestion, RetrievalQuestion, multihop_questions, retrieval_questions, write_context_documents,
    write_grounded_demonstrations, write_react_demonstrations,
)

K = 1  # sources per prompt: the best chunk (a bigger model can weigh more; this one copies)


# The tuning mixture: grounded demonstrations about this world's training people and about the people
# of another world (so many names that copying them from the sources beats memorising them),
# ReAct traces, and the SFT data replayed.
GROUNDED_SHARE, OTHER_WORLD_SHARE, REACT_SHARE, REPLAY_SHARE = 0.5, 1.0, 0.6, 0.5
TUNING_LR = 3e-3  # copying from the sources was learned in fewer steps than at 1e-3 (600-800-step trials)


@dataclass
class Retrieval:
    section: str
    figures: dict[str, Any]  # for summary.json
    store: Path
    model: Path  # the SFT model tuned for grounded answers and ReAct
    questions: list[RetrievalQuestion]  # held-out questions whose answers pretraining never saw
    grounding: GroundedResult  # the tuned model on them, without and with the store
    hop_questions: list[MultiHopQuestion]  # held-out two-hop questions
    multihop: MultiHopResult  # the tuned model on them: one retrieval, two, the agent


def tune_for_retrieval(out: Path, world: World, sft_model: Path, seed: int, steps: int) -> tuple[Path, float]:
    """Full fine-tuning of the SFT model on grounded-answer and ReAct demonstrations about the
    training people, with the SFT data replayed so that plain questions and refusals keep working.
    (LoRA of rank 16 did not learn to copy from the sources at this size: its loss stayed near 1.9.)"""
    grounded = write_grounded_demonstrations(world, out / "world" / "grounded-sft.jsonl", "train", k=K, seed=seed)
    other = make_world(world.seed + 1, n_people=2000, n_companies=20)
    elsewhere = write_grounded_demonstrations(other, out / "world" / "grounded-other-world.jsonl", "train", k=K,
                                              seed=seed)
    react = write_react_demonstrations(world, out / "world" / "react-sft.jsonl", "train")
    datasets = [DatasetSpec(path=grounded, weight=GROUNDED_SHARE), DatasetSpec(path=elsewhere, weight=OTHER_WORLD_SHARE),
                DatasetSpec(path=react, weight=REACT_SHARE),
                DatasetSpec(path=out / "world" / "sft.jsonl", weight=REPLAY_SHARE),
                DatasetSpec(path=out / "world" / "safety-sft.jsonl", weight=REPLAY_SHARE / 4)]
    start = time.perf_counter()
    adapter = sft(SFTConfig(
        out_dir=out / "rag-sft", base=sft_model,
        data=SFTDataConfig(datasets=datasets, max_len=256, val_fraction=0.05),
        adapter=AdapterConfig(method="full"),
        train=TrainConfig(steps=steps, micro_batch_size=16, lr=TUNING_LR, warmup_steps=10, weight_decay=0.0,
                          log_every=10, eval_every=max(1, steps // 3), save_every=steps, seed=seed)))
    return adapter, time.perf_counter() - start


def build_store(out: Path, world: World) -> tuple[Store, float]:
    """The world's context store in `out/store` (rebuilt), and the seconds indexing took."""
    documents = write_context_documents(world, out / "world" / "context.jsonl")
    shutil.rmtree(out / "store", ignore_errors=True)
    start = time.perf_counter()
    store = Store.create(out / "store")
    store.add(read_documents([documents]), progress=False)
    return store, time.perf_counter() - start


def retrieval_stage(out: Path, world: World, sft_model: Path, seed: int, steps: int) -> Retrieval:
    """Index the store, tune the SFT model for it, and measure the tuned model with and without it."""
    store, seconds = build_store(out, world)
    model, tune_seconds = tune_for_retrieval(out, world, sft_model, seed, steps)
    session = Session.load(model)
    updated = retrieval_questions(world, "heldout")
    texts, answers = [r.question.question for r in updated], [r.question.answer for r in updated]
    gold = [r.doc_id for r in updated]
    recall = {(mode, k): recall_at_k(store, texts, [{d} for d in gold], k, mode)
              for mode in ("dense", "bm25", "hybrid") for k in (1, 5)}
    grounding = compare_grounding(session, store, texts, answers, gold, k=K)

    multihop = multihop_questions(world, "heldout")
    hop_texts, hop_answers = [q.question for q in multihop], [q.answer for q in multihop]
    hop_recall = recall_at_k(store, hop_texts, [{h.doc_id for h in q.hops} for q in multihop], 5)
    hops = compare_multihop(session, store, hop_texts, hop_answers, k=K)

    n_documents, n_chunks = len(store.documents()), len(store)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(updated):
        by_kind[r.kind].append(i)
    lines = [
        "## Retrieval: grounded answers from a context store\n",
        f"The context store holds today's facts, one sentence per document: every public attribute of the "
        f"{len(world.people)} people (including those absent from pretraining, and the new employers of those who "
        f"changed jobs) and of the companies: {n_documents} documents, {n_chunks} chunks, "
        f"embedded with all-MiniLM-L6-v2 into a flat faiss index in {seconds:.1f} s (`lmforge rag index`). "
        f"The SFT model is then fine-tuned for {steps} steps ({tune_seconds:.0f} s) on grounded demonstrations "
        "(sources numbered in the prompt, the answer citing one) and ReAct traces about the *training* people, with "
        "the SFT data replayed; the questions below are about held-out people.\n",
        "| retrieval | recall@1 | recall@5 |", "|---|---:|---:|",
        *[f"| {mode} | {recall[(mode, 1)]:.0%} | {recall[(mode, 5)]:.0%} |" for mode in ("dense", "bm25", "hybrid")],
        "",
        f"Exact match of the tuned model's greedy answers, closed-book and with the best {K} chunk(s) as sources:\n",
        "| questions | closed-book | with retrieval | answer cites the right source |", "|---|---:|---:|---:|",
    ]
    for kind, label in (("absent", "people absent from pretraining"), ("changed", "employers changed since")):
        rows = by_kind.get(kind, [])
        if rows:
            pick = lambda values: [values[i] for i in rows]  # noqa: E731
            cited = sum(any(h.doc_id == gold[i] for h in grounding.grounded[i].cited()) for i in rows) / len(rows)
            lines.append(f"| {label} ({len(rows)}) | {exact_match_rate(pick(grounding.closed_book), pick(answers)):.0%} | "
                         f"{exact_match_rate([g.answer for g in pick(grounding.grounded)], pick(answers)):.0%} | "
                         f"{cited:.0%} |")
    lines += [f"| **all** ({len(updated)}) | {grounding.closed_book_em:.0%} | **{grounding.grounded_em:.0%}** | "
              f"{grounding.cites_gold:.0%} |", "",
              "| question | closed-book | with retrieval | sources |", "|---|---|---|---|"]
    for i in [*by_kind.get("changed", [])[:2], *by_kind.get("absent", [])[:3]]:
        g = grounding.grounded[i]
        sources = ", ".join(f"[{n}] {h.doc_id}" for n, h in enumerate(g.sources, 1))
        lines.append(f"| {texts[i]} | {table_cell(grounding.closed_book[i], 50)} | {table_cell(g.reply, 60)} | "
                     f"{sources} |")
    lines += [
        "",
        f"Two-hop questions ({len(multihop)}, e.g. *{hop_texts[0]}*): of the two facts each needs, "
        f"{hop_recall:.0%} are among the first 5 chunks retrieved for the question itself. Exact match:\n",
        "| method | exact match |", "|---|---:|",
        f"| one retrieval (`rag ask`) | {hops.single_em:.0%} |",
        f"| two retrievals, the first answer searched for (`rag ask --hops 2`) | {hops.iterative_em:.0%} |",
        f"| ReAct agent: search, observe, search again (`lmforge agent`) | **{hops.agent_em:.0%}** |",
        "",
    ]
    solved = next((t for t, a in zip(hops.agent, hop_answers) if t.answer == a), hops.agent[0])
    lines += ["An agent trace:\n", "```", solved.render(), "```", ""]
    print(f"[demo] retrieval: exact match {grounding.closed_book_em:.0%} closed-book -> {grounding.grounded_em:.0%} "
          f"with retrieval; two-hop {hops.single_em:.0%} single, {hops.iterative_em:.0%} iterative, "
          f"{hops.agent_em:.0%} agent")
    store.close()
    figures = {"documents": n_documents, "chunks": n_chunks,
               "recall": {f"{mode}@{k}": v for (mode, k), v in recall.items()}, "questions": len(updated),
               "closed_book_em": grounding.closed_book_em, "grounded_em": grounding.grounded_em,
               "cites_gold": grounding.cites_gold,
               "two_hop": {"questions": len(multihop), "recall@5": hop_recall, "single_em": hops.single_em,
                           "iterative_em": hops.iterative_em, "agent_em": hops.agent_em}}
    return Retrieval("\n".join(lines) + "\n", figures, out / "store", model, updated, grounding, multihop, hops)
