"""Journey 7, Ground answers, through the command line alone: `lmforge rag index --store kb/ docs/`
builds the store from a folder; `lmforge rag ask` answers with numbered sources; `lmforge agent`
answers a two-hop question and prints its trace; `lmforge serve --store kb/` answers from the store
with a `sources` list. The model is a micro chat llama fine-tuned until it recites one grounded answer
and one ReAct trace over the world (as a tuned model would give them), so what it prints is checkable
against the world's facts and the store's own rankings."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from chat_data import make_chat_base
from live_server import lmforge_serve

from lmforge.checkpoint import load_model, save_model
from lmforge.cli import main
from lmforge.data.chat import collate, encode
from lmforge.rag.prompts import cite, grounded_messages
from lmforge.rag.store import Store
from lmforge.tokenizer import Tokenizer
from lmforge.train.losses import causal_lm_loss
from lmforge.world.people import make_world
from lmforge.world.store import context_documents, multihop_questions, react_messages, retrieval_questions

WORLD = make_world(0, n_people=20, n_companies=4)
K = 2
AGENT_LINES = ["Question", "Thought", "Action", "Observation", "Thought", "Action", "Observation", "Thought",
               "Final Answer"]


def write_docs(folder: Path) -> list[dict]:
    """The world's context documents as a folder of two JSONL files (people, companies)."""
    docs = context_documents(WORLD)
    folder.mkdir()
    for kind in ("person", "company"):
        (folder / f"{kind}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs if d["kind"] == kind))
    return docs


def memorize(base: Path, chats: list[list[dict]], out: Path, max_steps: int = 400) -> Path:
    """Full fine-tuning of `base` on the assistant turns of `chats` until it recites them greedily."""
    tokenizer = Tokenizer.from_dir(base)
    batch = collate([encode(tokenizer, chat, 1024) for chat in chats], tokenizer.pad_id)
    model = load_model(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(max_steps):
        total, tokens = causal_lm_loss(model, batch)
        loss = total / tokens
        if loss.item() < 0.005:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.005, f"not memorized: loss {loss.item():.4f}"
    save_model(model, out, tokenizer=tokenizer)
    return out


def printed_sources(lines: list[str]) -> list[str]:
    """`rag ask`'s source lines without scores and texts: "*[1] DOC_ID" (cited) or " [2] DOC_ID"."""
    start = lines.index("Sources:") + 1
    return [line.split(" (score")[0] for line in lines[start:start + K]]


@pytest.mark.slow
def test_ground_journey(tmp_path, capsys):
    docs = write_docs(tmp_path / "docs")
    kb = tmp_path / "kb"
    assert main(["rag", "index", "--store", str(kb), str(tmp_path / "docs")]) == 0
    assert f"{len(docs)} documents added" in capsys.readouterr().out

    with Store.open(kb) as store:
        hop = next(q for q in multihop_questions(WORLD, "train") if q.kind == "employer_headquarters"
                   and all(store.search(h.query, 1)[0].doc_id == h.doc_id for h in q.hops))
        asked = next(r for r in retrieval_questions(WORLD, "train")
                     if store.search(r.question.question, 1)[0].doc_id == r.doc_id)
        question, answer = asked.question.question, asked.question.answer
        ranked = store.search(question, K)
    texts = {d["id"]: d["text"] for d in docs}
    grounded = [*grounded_messages(question, [h.text for h in ranked]),
                {"role": "assistant", "content": cite(answer, 1)}]
    model = memorize(make_chat_base(tmp_path / "base", context=1024),
                     [grounded, react_messages(hop.question, hop.hops, hop.answer, texts.__getitem__)],
                     tmp_path / "model")

    assert main(["rag", "ask", "--store", str(kb), "--checkpoint", str(model), "--k", str(K),
                 "--max-new-tokens", "64", question]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == answer and "(the answer cites none of them)" not in lines
    assert printed_sources(lines) == [f"*[1] {asked.doc_id}", f" [2] {ranked[1].doc_id}"]

    assert main(["agent", "--store", str(kb), "--checkpoint", str(model), "--max-new-tokens", "160",
                 hop.question]) == 0
    trace = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in trace] == AGENT_LINES and trace[0] == f"Question: {hop.question}"
    searches = [line.removeprefix("Action: search[").removesuffix("]") for line in trace if line.startswith("Action:")]
    assert searches == [h.query for h in hop.hops]
    assert [line for line in trace if line.startswith("Observation:")] == \
        [f"Observation: {texts[h.doc_id]}" for h in hop.hops]
    assert trace[-1] == f"Final Answer: {hop.answer}"

    with lmforge_serve(tmp_path / "serve.log", "--checkpoint", str(model), "--store", str(kb),
                       "--rag-k", str(K)) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="model", messages=[{"role": "user", "content": question}],
                                               max_tokens=64, temperature=0)
    assert reply.choices[0].message.content == cite(answer, 1) and reply.choices[0].finish_reason == "stop"
    assert [(s["index"], s["doc_id"], s["text"]) for s in reply.to_dict()["sources"]] == \
        [(i, h.doc_id, h.text) for i, h in enumerate(ranked, 1)]
