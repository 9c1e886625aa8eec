"""Grounded answers: retrieve from a store, answer from numbered sources, cite them.

Multi-hop questions ("where is the headquarters of the company Ada works for?") rarely have every
needed fact in the first retrieval. With `hops=2` the model's first answer becomes the follow-up
query (iterative retrieval-generation, Shao et al. 2023): its draft names the entity the question
hinges on ("...of Bluepeak Labs..."), so the second search finds that entity's document; the model
then answers again from the best sources of both searches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain, zip_longest

from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete
from lmforge.rag.agent import calculator_tool
from lmforge.rag.prompts import grounded_messages, parse_citations
from lmforge.rag.store import Hit, Mode, Store
from lmforge.tokenizer import Message


@dataclass
class GroundedAnswer:
    question: str
    answer: str  # the reply without its citation markers
    reply: str  # the reply as generated
    citations: list[int]  # the source numbers the reply cites (1-based, as in the prompt)
    sources: list[Hit]  # the sources in the prompt, in their numbered order
    queries: list[str]  # the search queries, one per hop

    def cited(self) -> list[Hit]:
        """The sources the reply cites (numbers outside the prompt's sources are ignored)."""
        return [self.sources[n - 1] for n in self.citations if 1 <= n <= len(self.sources)]


def grounded_chat_prompt(session: Session, messages: Sequence[Message], sources: list[Hit],
                         reserve: int) -> tuple[list[int], list[Hit]]:
    """The chat prompt with the last (user) message replaced by the grounded prompt over `sources`,
    dropping the lowest-ranked sources (then the oldest turns) until it fits the context with
    `reserve` tokens to spare. Returns the prompt and the sources kept (none: the plain chat)."""
    *history, last = messages
    while sources:
        chat = [*history, *grounded_messages(last["content"], [h.text for h in sources])]
        prompt = session.chat_prompt(chat, reserve)
        if len(prompt) + reserve <= session.context or len(sources) == 1:
            return prompt, sources
        sources = sources[:-1]
    return session.chat_prompt(messages, reserve), []


def answer_questions(
    session: Session, store: Store, questions: Sequence[str], params: SamplingParams, *, k: int = 3,
    mode: Mode = "dense", hops: int = 1, batch_size: int = 32,
) -> list[GroundedAnswer]:
    """Answer every question from the `k` best chunks of `store`, in batches; with `hops` > 1 each
    earlier answer is searched for too and the sources merged (best of each search first)."""
    if hops < 1:
        raise ValueError(f"hops must be at least 1, got {hops}")
    questions = list(questions)
    queries = [[q] for q in questions]
    sources = store.search_many(questions, k, mode)
    for hop in range(hops):
        prompts, kept = [], []
        for question, hits in zip(questions, sources):
            prompt, used = grounded_chat_prompt(session, [{"role": "user", "content": question}], hits,
                                                params.max_new_tokens)
            prompts.append(prompt)
            kept.append(used)
        replies = []
        for start in range(0, len(prompts), batch_size):
            replies += complete(session.engine, session.tokenizer, prompts[start : start + batch_size], params)
        if hop == hops - 1:
            break
        follow_ups = [parse_citations(r.text)[0] or q for r, q in zip(replies, questions)]
        for query, follow_up in zip(queries, follow_ups):
            query.append(follow_up)
        found = store.search_many(follow_ups, k, mode)
        sources = [interleave(old, new, k) for old, new in zip(kept, found)]
    answers = []
    for question, reply, hits, asked in zip(questions, replies, kept, queries):
        text, citations = parse_citations(reply.text)
        answers.append(GroundedAnswer(question, text, reply.text.strip(), citations, hits, asked))
    return answers


def interleave(first: list[Hit], second: list[Hit], k: int) -> list[Hit]:
    """Up to `k` distinct chunks taking turns from two rankings (so each search's best is kept)."""
    merged: list[Hit] = []
    seen: set[int] = set()
    for hit in chain.from_iterable(zip_longest(first, second)):
        if hit is not None and hit.chunk_id not in seen and len(merged) < k:
            merged.append(hit)
            seen.add(hit.chunk_id)
    return merged


def agent_tools(store: Store, mode: Mode = "dense") -> dict[str, Callable[[str], str]]:
    """The ReAct agent's tools: `search` (the store's best chunk for the query) and `calculator`."""

    def search(query: str) -> str:
        hits = store.search(query, 1, mode)
        return hits[0].text if hits else "nothing found"

    return {"search": search, "calculator": calculator_tool}
