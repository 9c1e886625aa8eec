"""Grounded answers over a context store: the prompt holds the retrieved chunks as numbered sources
in rank order and fits the context; answers are the model's greedy replies to exactly that prompt;
a second hop searches for the first answer; the server and the command line answer from a store."""

from __future__ import annotations

import json

import httpx
import pytest
from chat_data import make_chat_base
from live_server import LiveServer

from lmforge.cli import main
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete
from lmforge.rag.agent import run_agents
from lmforge.rag.answer import agent_tools, answer_questions, grounded_chat_prompt, interleave
from lmforge.rag.documents import read_documents
from lmforge.rag.evaluate import recall_at_k
from lmforge.rag.prompts import grounded_messages, parse_citations
from lmforge.rag.store import Hit, Store
from lmforge.serve.server import create_app
from lmforge.world.documents import questions
from lmforge.world.people import make_world
from lmforge.world.store import context_documents, retrieval_questions, write_context_documents

WORLD = make_world(0, n_people=20, n_companies=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A micro chat model (random weights) with room for a few sources in its context."""
    return make_chat_base(tmp_path_factory.mktemp("base"), context=1024)


@pytest.fixture(scope="module")
def session(base) -> Session:
    return Session.load(base)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    docs = write_context_documents(WORLD, tmp_path_factory.mktemp("docs") / "world.jsonl")
    store = Store.create(tmp_path_factory.mktemp("store") / "kb")
    store.add(read_documents([docs]), progress=False)
    return store


def reply_to(session: Session, messages: list[dict], params: SamplingParams) -> str:
    """The oracle: the greedy reply to a chat rendered by the template, one prompt alone."""
    prompt = session.tokenizer.encode(session.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return complete(session.engine, session.tokenizer, [prompt], params)[0].text


def test_the_prompt_numbers_the_sources_in_rank_order_and_drops_the_last_to_fit(session, store):
    question = questions(WORLD, "train")[0].question
    hits = store.search(question, 4)
    prompt, kept = grounded_chat_prompt(session, [{"role": "user", "content": question}], hits, reserve=16)
    text = session.tokenizer.decode(prompt)
    assert kept == hits
    positions = [text.index(f"[{i}] {' '.join(h.text.split())}") for i, h in enumerate(hits, 1)]
    assert positions == sorted(positions) and text.index(f"Question: {question}") > positions[-1]

    room = len(prompt) - 1  # one token short for all four sources: the lowest-ranked goes
    _, fewer = grounded_chat_prompt(session, [{"role": "user", "content": question}], hits,
                                    reserve=session.context - room)
    assert fewer == hits[: len(fewer)] and len(fewer) < len(hits)
    plain, none = grounded_chat_prompt(session, [{"role": "user", "content": question}], [], reserve=16)
    assert none == [] and plain == session.chat_prompt([{"role": "user", "content": question}])


def test_answers_are_greedy_replies_to_the_grounded_prompt_and_hops_search_the_answer(session, store):
    asked = [q.question for q in questions(WORLD, "train")[:3]]
    params = session.greedy(12)
    one = answer_questions(session, store, asked, params, k=2)
    two = answer_questions(session, store, asked, params, k=2, hops=2)
    for question, a, b in zip(asked, one, two):
        hits = store.search(question, 2)
        assert [h.chunk_id for h in a.sources] == [h.chunk_id for h in hits] and a.queries == [question]
        reply = reply_to(session, grounded_messages(question, [h.text for h in hits]), params).strip()
        assert a.reply == reply and (a.answer, a.citations) == parse_citations(reply)

        follow_up = parse_citations(reply)[0] or question
        assert b.queries == [question, follow_up]
        merged = interleave(hits, store.search(follow_up, 2), 2)
        assert [h.chunk_id for h in b.sources] == [h.chunk_id for h in merged]
        assert b.reply == reply_to(session, grounded_messages(question, [h.text for h in merged]), params).strip()


def hit(chunk_id: int) -> Hit:
    return Hit(chunk_id, f"d{chunk_id}", "", {}, 0.0, 1, 0)


def test_interleave_takes_turns_and_skips_repeats():
    ids = lambda hits: [h.chunk_id for h in hits]  # noqa: E731
    assert ids(interleave([hit(1), hit(2), hit(3)], [hit(2), hit(5)], 4)) == [1, 2, 5, 3]
    assert ids(interleave([hit(1)], [hit(7), hit(8)], 2)) == [1, 7]
    assert ids(interleave([], [hit(4)], 3)) == [4]


def test_agent_tools_search_the_store_and_calculate(store):
    tools = agent_tools(store)
    person = WORLD.people[3]
    assert tools["search"](person.name) == store.search(person.name, 1)[0].text
    assert tools["calculator"]("2 * (3 + 4)") == "14"


def test_the_server_answers_from_the_store_with_its_sources(session, store):
    question = questions(WORLD, "train")[5].question
    hits = store.search(question, 2)
    params = session.greedy(10)
    expected = reply_to(session, grounded_messages(question, [h.text for h in hits]), params)
    with LiveServer(create_app(session, model_name="m", store=store, rag_k=2)) as live:
        body = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": 10, "temperature": 0}
        response = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert response["choices"][0]["message"]["content"] == expected
        assert [(s["index"], s["doc_id"], s["text"]) for s in response["sources"]] == \
            [(i, h.doc_id, h.text) for i, h in enumerate(hits, 1)]
        with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert chunks[0]["sources"] == response["sources"] and all("sources" not in c for c in chunks[1:])
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected


def test_command_line_index_list_search_ask_remove(tmp_path, base, session, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    records = [d for d in context_documents(WORLD) if d["attribute"] == "employer"][:6]  # six people
    (docs / "people.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:5]))
    (docs / "note.md").write_text(records[5]["text"])
    kb = tmp_path / "kb"
    assert main(["rag", "index", "--store", str(kb), str(docs)]) == 0
    assert "6 documents added" in capsys.readouterr().out
    assert main(["rag", "index", "--store", str(kb), str(docs)]) == 0
    assert "0 documents added, 0 replaced, 6 unchanged" in capsys.readouterr().out

    assert main(["rag", "list", "--store", str(kb)]) == 0
    listed = capsys.readouterr().out.split()
    assert sorted(r["id"] for r in records[:5]) == [d for d in listed if not d.endswith("note.md")]

    name = records[2]["name"]
    assert main(["rag", "search", "--store", str(kb), "--k", "1", f"Where does {name} work?"]) == 0
    assert capsys.readouterr().out.startswith(f"1. {records[2]['id']} ")

    question = f"Where was {name} born?"
    assert main(["rag", "ask", "--store", str(kb), "--checkpoint", str(base), "--k", "2", "--max-new-tokens", "8",
                 question]) == 0
    printed = capsys.readouterr().out.splitlines()
    with Store.open(kb) as opened:
        [expected] = answer_questions(session, opened, [question], session.greedy(8), k=2)
    assert printed[0] == (expected.answer or "(no answer)") and printed[2] == "Sources:"
    assert [line.split(" (score")[0].lstrip("* ") for line in printed[3:5]] == \
        [f"[{i}] {h.doc_id}" for i, h in enumerate(expected.sources, 1)]

    assert main(["rag", "remove", "--store", str(kb), records[2]["id"]]) == 0
    assert "chunks removed" in capsys.readouterr().out
    assert main(["rag", "search", "--store", str(kb), "--k", "1", f"Where does {name} work?"]) == 0
    assert not capsys.readouterr().out.startswith(f"1. {records[2]['id']} ")
    assert main(["rag", "remove", "--store", str(kb), "no-such-doc"]) == 2


def test_command_line_agent_prints_the_trace_of_run_agents(tmp_path, base, session, store, capsys):
    question = f"Where is the headquarters of the company {WORLD.people[0].name} works for?"
    assert main(["agent", "--store", str(store.path), "--checkpoint", str(base), "--max-steps", "2",
                 "--max-new-tokens", "12", question]) == 0
    printed = capsys.readouterr().out
    [trace] = run_agents([question], lambda chats: session.replies(chats, session.greedy(12)), agent_tools(store),
                         max_steps=2)
    assert printed.startswith(trace.render())
    if trace.answer is None:
        assert "(no final answer within 2 steps)" in printed


def test_command_line_agent_runs_through_an_openai_compatible_server(base, session, store, capsys):
    """`lmforge agent --api-base`: each step a tool call from the served model, printed as the trace the
    official client's replies give through `tool_calling_completer`; a bad request is the server's error."""
    openai = pytest.importorskip("openai")
    from lmforge.rag.agent import tool_calling_completer

    question = f"Where does {WORLD.people[1].name} work?"
    with LiveServer(create_app(session, model_name="base")) as live:
        flags = ["--store", str(store.path), "--api-base", live.url + "/v1", "--max-steps", "1",
                 "--max-new-tokens", "250", "--tool-choice", "required"]
        assert main(["agent", *flags, "--model", "base", question]) == 0
        printed = capsys.readouterr().out
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)

        def chat(**request):
            return client.chat.completions.create(**request).choices[0].message.model_dump()

        tools = agent_tools(store)
        complete = tool_calling_completer(chat, tools, model="base", tool_choice="required", parallel_tool_calls=False,
                                          max_tokens=250, temperature=0.0)
        [trace] = run_agents([question], complete, tools, max_steps=1)
        assert printed == trace.render() + "\n(no final answer within 1 steps)\n"
        assert trace.steps[0].tool in tools

        assert main(["agent", *flags, question]) == 2
        assert "--api-base needs --model" in capsys.readouterr().err
        assert main(["agent", *flags, "--model", "base", "--max-new-tokens", "1000", question]) == 2
        assert f"{live.url}/v1/chat/completions answered 400: the prompt's" in capsys.readouterr().err


def test_recall_at_k_on_the_world(store):
    """Dense retrieval finds the fact a held-out question needs among the first five chunks."""
    asked = retrieval_questions(WORLD, "heldout")
    texts, gold = [r.question.question for r in asked], [r.doc_id for r in asked]
    by_hand = [sum(g in {h.doc_id for h in store.search(t, k)} for t, g in zip(texts, gold)) / len(asked)
               for k in (1, 5)]
    measured = [recall_at_k(store, texts, [{g} for g in gold], k) for k in (1, 5)]
    print(f"world recall@1 {measured[0]:.0%}, recall@5 {measured[1]:.0%} ({len(asked)} questions)")
    assert measured == pytest.approx(by_hand) and measured[1] >= 0.9 and measured[1] >= measured[0]
