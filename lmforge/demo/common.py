"""Helpers the demo's stages share: greedy answers to the world's questions, and sentences that
state how a measured figure changed."""

from __future__ import annotations

from lmforge.generate.session import Session
from lmforge.world.documents import Question


def greedy_chat_answers(session: Session, qs: list[Question]) -> list[tuple[str, bool]]:
    """Greedy answers to chat questions, and whether each equals the true answer."""
    answers = session.replies([[{"role": "user", "content": q.question}] for q in qs], session.greedy(16))
    return [(a, a == q.answer) for a, q in zip(answers, qs)]


def mean(results: list) -> float:
    """The mean of numbers or flags (of `(answer, ok)` pairs: the share with `ok`); 0 for none."""
    flags = [r[1] if isinstance(r, tuple) else r for r in results]
    return sum(flags) / max(1, len(flags))


def points(before: float, after: float) -> int:
    """The change between two shares in rounded percentage points, as the report shows them."""
    return round(100 * after) - round(100 * before)


def change(before: float, after: float) -> str:
    """How a share moved, e.g. "rose from 40% to 55% (+15 points)", "stayed at 40%"."""
    delta = points(before, after)
    if delta == 0:
        return f"stayed at {after:.0%}"
    verb = "rose" if delta > 0 else "fell"
    return f"{verb} from {before:.0%} to {after:.0%} ({delta:+d} points)"


def score_change(before: float, after: float) -> str:
    """How a score shown with two decimals moved, e.g. "rose from 0.12 to 0.40 (+0.28)"."""
    delta = round(after, 2) - round(before, 2)
    if abs(delta) < 0.005:
        return f"stayed at {after:.2f}"
    return f"{'rose' if delta > 0 else 'fell'} from {before:.2f} to {after:.2f} ({delta:+.2f})"
