"""Measure retrieval-augmented answering on questions with known answers and gold documents:
retrieval recall@k, exact match closed-book vs grounded, and multi-hop questions answered from a
single retrieval, from two (the first answer searched for), and by the ReAct agent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.eval import metrics
from lmforge.generate.session import Session
from lmforge.rag.agent import Trace, run_agents
from lmforge.rag.answer import GroundedAnswer, agent_tools, answer_questions
from lmforge.rag.store import Mode, Store


def recall_at_k(store: Store, queries: Sequence[str], gold: Sequence[set[str]], k: int, mode: Mode = "dense") -> float:
    """The share of gold documents found among each query's top `k` chunks (averaged over queries)."""
    found = store.search_many(list(queries), k, mode)
    shares = [len(want & {h.doc_id for h in hits}) / len(want) for hits, want in zip(found, gold)]
    return sum(shares) / max(1, len(shares))


@dataclass
class GroundedResult:
    closed_book: list[str]  # replies without retrieval
    grounded: list[GroundedAnswer]
    closed_book_em: float
    grounded_em: float
    cites_gold: float  # share of grounded answers citing a chunk of the gold document


def compare_grounding(session: Session, store: Store, questions: Sequence[str], answers: Sequence[str],
                      gold: Sequence[str], *, k: int = 2, mode: Mode = "dense", max_new_tokens: int = 32) -> GroundedResult:
    """Exact match of greedy answers without and with retrieval (citation markers stripped)."""
    params = session.greedy(max_new_tokens)
    closed = session.replies([[{"role": "user", "content": q}] for q in questions], params)
    grounded = answer_questions(session, store, questions, params, k=k, mode=mode)
    return GroundedResult(
        closed, grounded, exact_match_rate(closed, answers), exact_match_rate([g.answer for g in grounded], answers),
        sum(any(h.doc_id == d for h in g.cited()) for g, d in zip(grounded, gold)) / max(1, len(gold)))


@dataclass
class MultiHopResult:
    single: list[GroundedAnswer]
    iterative: list[GroundedAnswer]
    agent: list[Trace]
    single_em: float
    iterative_em: float
    agent_em: float


def compare_multihop(session: Session, store: Store, questions: Sequence[str], answers: Sequence[str], *,
                     k: int = 2, mode: Mode = "dense", max_steps: int = 4, max_new_tokens: int = 48) -> MultiHopResult:
    """Exact match on multi-hop questions: one retrieval, two (`hops=2`), and the ReAct agent."""
    params = session.greedy(max_new_tokens)
    single = answer_questions(session, store, questions, params, k=k, mode=mode)
    iterative = answer_questions(session, store, questions, params, k=k, mode=mode, hops=2)
    traces = run_agents(list(questions), lambda chats: session.replies(chats, params), agent_tools(store, mode),
                        max_steps=max_steps)
    return MultiHopResult(single, iterative, traces, exact_match_rate([a.answer for a in single], answers),
                          exact_match_rate([a.answer for a in iterative], answers),
                          exact_match_rate([t.answer or "" for t in traces], answers))


def exact_match_rate(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """The share of predictions equal to their answers (surrounding whitespace ignored)."""
    return sum(metrics.exact_match(p, a) for p, a in zip(predictions, answers)) / max(1, len(answers))
