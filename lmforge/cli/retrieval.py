"""Retrieval commands: `lmforge rag index|remove|list|search|ask` over a context store, and `lmforge agent`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from lmforge.cli.common import (
    CHECKPOINT_HELP, Subcommands, add_generation_flags, load_session, runs, sampling_params,
)

MODES = ("dense", "bm25", "hybrid")


def add_retrieval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=3, help="chunks to retrieve (default 3)")
    p.add_argument("--mode", choices=MODES, default="dense",
                   help="dense (embeddings), bm25 (words) or hybrid (both, fused by reciprocal rank) (default dense)")


def index(args: argparse.Namespace) -> None:
    from lmforge.rag.documents import read_documents
    from lmforge.rag.embed import load_embedder
    from lmforge.rag.store import Store

    documents = read_documents(args.paths)
    embedder = load_embedder(args.embedding_model) if args.embedding_model else None
    if Store.is_store(args.store):
        store = Store.open(args.store, embedder)
    else:
        store = Store.create(args.store, embedder, index=args.index, chunk_tokens=args.chunk_tokens,
                             overlap=args.overlap)
    with store:
        stats = store.add(documents)
        print(f"{args.store}: {stats.added} documents added, {stats.replaced} replaced, {stats.unchanged} unchanged; "
              f"{stats.chunks} chunks embedded; {len(store.documents())} documents, {len(store)} chunks in all")


def remove(args: argparse.Namespace) -> None:
    from lmforge.rag.store import Store

    with Store.open(args.store) as store:
        for doc_id in args.doc_ids:
            print(f"{doc_id}: {store.remove(doc_id)} chunks removed")


def list_documents(args: argparse.Namespace) -> None:
    from lmforge.rag.store import Store

    with Store.open(args.store) as store:
        for doc_id in store.documents():
            print(doc_id)


def search(args: argparse.Namespace) -> None:
    from lmforge.rag.store import Store

    with Store.open(args.store) as store:
        for hit in store.search(args.query, args.k, args.mode):
            print(f"{hit.rank}. {hit.doc_id} (score {hit.score:.3f})\n   {' '.join(hit.text.split())}")


def ask(args: argparse.Namespace) -> None:
    from lmforge.rag.answer import answer_questions
    from lmforge.rag.store import Store

    session = load_session(args)
    params = session.sampling(sampling_params(args))
    with Store.open(args.store) as store:
        [answer] = answer_questions(session, store, [args.question], params, k=args.k, mode=args.mode, hops=args.hops)
    print(answer.answer or "(no answer)")
    print("\nSources:")
    cited = {hit.chunk_id for hit in answer.cited()}
    for number, hit in enumerate(answer.sources, 1):
        mark = "*" if hit.chunk_id in cited else " "
        print(f"{mark}[{number}] {hit.doc_id} (score {hit.score:.3f}): {' '.join(hit.text.split())[:160]}")
    if not cited:
        print("(the answer cites none of them)")


def agent(args: argparse.Namespace) -> None:
    from lmforge.rag.agent import run_agents
    from lmforge.rag.answer import agent_tools
    from lmforge.rag.store import Store

    with Store.open(args.store) as store:
        tools = agent_tools(store, args.mode)
        complete = api_completer(args, tools) if args.api_base else checkpoint_completer(args)
        [trace] = run_agents([args.question], complete, tools, max_steps=args.max_steps)
    print(trace.render())
    if trace.answer is None:
        print(f"(no final answer within {args.max_steps} steps)")


def checkpoint_completer(args: argparse.Namespace) -> Callable[[list[list[dict[str, str]]]], list[str]]:
    session = load_session(args)
    params = session.sampling(sampling_params(args))
    return lambda chats: session.replies(chats, params, stop=args.stop)


def api_completer(args: argparse.Namespace, tools: Mapping[str, Callable[[str], str]]) -> Callable[[list[list[dict[str, str]]]], list[str]]:
    """The agent's turns from an OpenAI-compatible server, its tools offered as functions."""
    from lmforge.rag.agent import api_chat, tool_calling_completer

    if not args.model:
        raise ValueError("--api-base needs --model (the served model's name, as GET /v1/models lists it)")
    params = sampling_params(args)
    request = {"model": args.model, "tool_choice": args.tool_choice, "parallel_tool_calls": False,
               "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
               "top_k": params.top_k, "seed": params.seed, "stop": args.stop or None}
    chat = api_chat(args.api_base, args.api_key or os.environ.get("OPENAI_API_KEY"))
    return tool_calling_completer(chat, tools, **{k: v for k, v in request.items() if v is not None})


def add_commands(sub: Subcommands) -> None:
    rag = sub.add_parser("rag", help="a context store: index documents, ask grounded questions",
                         description="Retrieval-augmented generation over a context store: chunk texts by tokens, "
                                     "embed them (sentence-transformers), keep vectors in faiss and texts in SQLite.")
    actions = rag.add_subparsers(dest="rag_command", required=True, metavar="ACTION")
    p = runs(actions.add_parser("index", help="add or update documents in a store (created if absent)",
                                description="Index .txt/.md files (one document each), JSONL ('text' plus metadata, "
                                            "optional 'id') and folders of them. A document indexed before is skipped "
                                            "if unchanged and has its chunks replaced if changed."), index)
    p.add_argument("--store", type=Path, required=True, help="store directory")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="files or folders to index")
    p.add_argument("--embedding-model", type=Path, default=None,
                   help="a local sentence-transformers directory (default: all-MiniLM-L6-v2, bundled); "
                        "fixed when the store is created")
    p.add_argument("--chunk-tokens", type=int, default=128, help="chunk length in embedding-model tokens "
                                                                 "(new stores; default 128)")
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by consecutive chunks (default 32)")
    p.add_argument("--index", choices=["flat", "hnsw"], default="flat",
                   help="faiss index of a new store: exact (flat) or approximate (hnsw) (default flat)")
    p = runs(actions.add_parser("remove", help="delete documents (and their chunks) from a store"), remove)
    p.add_argument("--store", type=Path, required=True, help="store directory")
    p.add_argument("doc_ids", nargs="+", metavar="DOC_ID", help="document ids (see `lmforge rag list`)")
    p = runs(actions.add_parser("list", help="list a store's documents"), list_documents)
    p.add_argument("--store", type=Path, required=True, help="store directory")
    p = runs(actions.add_parser("search", help="print the chunks retrieved for a query"), search)
    p.add_argument("--store", type=Path, required=True, help="store directory")
    p.add_argument("query", help="the search text")
    add_retrieval_flags(p)
    p = runs(actions.add_parser("ask", help="answer a question from the store, citing numbered sources",
                                description="Retrieve the best chunks, put them in the prompt as numbered sources, "
                                            "generate, and print the answer with the sources it cites. --hops 2 "
                                            "searches again for the first answer (multi-hop questions)."), ask)
    p.add_argument("--store", type=Path, required=True, help="store directory")
    p.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    p.add_argument("question", help="the question")
    p.add_argument("--hops", type=int, default=1, help="retrieval rounds; each later one searches for the "
                                                       "previous answer (default 1)")
    add_retrieval_flags(p)
    add_generation_flags(p, temperature=0.0)

    p = runs(sub.add_parser("agent", help="answer with a ReAct agent: search the store and calculate, step by step",
                            description="A Thought / Action / Observation loop: the model chooses search[query] "
                                        "(the store's best chunk) or calculator[expression] (arithmetic only) until "
                                        "it gives a Final Answer or runs out of steps. Prints the trace."), agent)
    p.add_argument("--store", type=Path, required=True, help="store directory")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help=CHECKPOINT_HELP)
    model.add_argument("--api-base", metavar="URL",
                       help="an OpenAI-compatible server instead (e.g. http://127.0.0.1:8000/v1 for `lmforge serve`): "
                            "the tools are offered as functions and each step's tool call is the action")
    p.add_argument("--model", help="with --api-base: the served model's name")
    p.add_argument("--api-key", default=None, help="with --api-base: the bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--tool-choice", choices=["auto", "required"], default="auto",
                   help="with --api-base: whether the model may answer in text (auto: its Final Answer) or must "
                        "call a tool every step (default auto)")
    p.add_argument("question", help="the question")
    p.add_argument("--max-steps", type=int, default=4, help="most assistant turns (default 4)")
    p.add_argument("--mode", choices=MODES, default="dense", help="retrieval for the search tool (default dense)")
    add_generation_flags(p, temperature=0.0)
