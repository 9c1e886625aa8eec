"""The grounded-answer format: numbered sources, then the question; the reply is the answer
followed by the number of the source it comes from, e.g. "Alice Okafor works for Bluepeak Labs. [2]".

The prompt is kept short because the models it trains are tiny (contexts of 256-512 tokens)."""

from __future__ import annotations

import re
from collections.abc import Sequence

INSTRUCTION = "Answer the question from the sources and cite the source number, like [1]."
_CITATION = re.compile(r"\s*\[(\d+(?:\s*,\s*\d+)*)\]")


def grounded_messages(question: str, sources: Sequence[str]) -> list[dict[str, str]]:
    """A chat of one user message: the instruction, the sources as `[1] text` lines, then the question."""
    if not sources:
        raise ValueError("grounded_messages needs at least one source")
    lines = [INSTRUCTION, *(f"[{i}] {' '.join(s.split())}" for i, s in enumerate(sources, 1)),
             f"Question: {question.strip()}"]
    return [{"role": "user", "content": "\n".join(lines)}]


def cite(answer: str, *numbers: int) -> str:
    """The reply format models are trained on: `"<answer> [n]"` (one marker per cited source)."""
    return " ".join([answer.strip(), *(f"[{n}]" for n in numbers)])


def parse_citations(reply: str) -> tuple[str, list[int]]:
    """Split a reply into the answer without citation markers and the cited source numbers
    (in order of first mention, without repeats); `[1, 3]` cites two sources."""
    numbers: list[int] = []
    for match in _CITATION.finditer(reply):
        for n in (int(x) for x in match.group(1).split(",")):
            if n not in numbers:
                numbers.append(n)
    answer = re.sub(r"[ \t]{2,}", " ", _CITATION.sub("", reply)).strip()
    return answer, numbers
