"""Helpers the demo's stages share."""

from __future__ import annotations

from lmforge.generate.session import Session
from lmforge.world.documents import Question


def exact_match(session: Session, qs: list[Question]) -> list[tuple[str, bool]]:
    """Greedy answers to chat questions, and whether each equals the true answer."""
    answers = session.replies([[{"role": "user", "content": q.question}] for q in qs], session.greedy(16))
    return [(a, a == q.answer) for a, q in zip(answers, qs)]


def mean(results: list) -> float:
    flags = [r[1] if isinstance(r, tuple) else r for r in results]
    return sum(flags) / max(1, len(flags))
