"""Commands that use a trained model: generate, chat, serve, merge, export."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import (
    CHECKPOINT_HELP, Subcommands, add_dtype_flag, add_generation_flags, add_quantize_flags, add_speculative_flags,
    drafter, load_session, quantization, report_speculation, runs, sampling_params, speculating,
    speculative_engine,
)


def generate(args: argparse.Namespace) -> None:
    grammar = None
    if args.json_schema is not None:
        from lmforge.generate.grammar import Grammar, GrammarError
        from lmforge.io import read_json

        grammar = Grammar.json_schema(read_json(args.json_schema))
    session = load_session(args)
    if grammar is not None:
        try:
            session.grammars.compile(grammar)
        except GrammarError as e:
            raise ValueError(f"{args.json_schema}: the schema cannot be compiled: {e}") from None
    params = session.sampling(sampling_params(args, grammar=grammar))
    if args.chat:
        prompt = session.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = session.encode(args.prompt)
    speculative = speculative_engine(args, session)
    for delta in session.stream(prompt, params, args.stop):
        print(delta, end="", flush=True)
    print()
    if speculative is not None:
        report_speculation(speculative)


def chat(args: argparse.Namespace) -> None:
    session = load_session(args)
    speculative_engine(args, session)
    session.chat_loop(session.sampling(sampling_params(args)), system=args.system, stop=args.stop)


def serve(args: argparse.Namespace) -> None:
    from lmforge.serve.server import serve

    speculating(args)  # a bad combination of the flags fails before anything loads
    serve(str(args.checkpoint), host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
          dtype=args.dtype, quantize=quantization(args), max_batch_size=args.max_batch_size, store=args.store,
          rag_k=args.rag_k, max_request_bytes=args.max_request_bytes, embedding_model=args.embedding_model,
          drafter=lambda session: drafter(args, session))


def merge(args: argparse.Namespace) -> None:
    from lmforge.peft.adapters import merge_and_save

    print(f"merged model written to {merge_and_save(args.checkpoint, args.out, dtype=args.dtype)}")


def export_gguf(args: argparse.Namespace) -> None:
    from lmforge.export.gguf import export_gguf
    from lmforge.hub import resolve_checkpoint

    export_gguf(resolve_checkpoint(args.checkpoint), args.out, dtype=args.dtype)
    print(f"GGUF ({args.dtype}) written to {args.out}")


def add_commands(sub: Subcommands) -> None:
    p = runs(sub.add_parser("merge", help="merge a LoRA adapter into its base model",
                            description="Write the adapter's base model with the LoRA weights folded in, as an "
                                        "HF-format directory (with the base's tokenizer)."), merge)
    p.add_argument("--checkpoint", type=Path, required=True, help="adapter directory (PEFT format) or its Hub id")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    add_dtype_flag(p, "weight dtype of the merged model (default: the base's)")

    p = runs(sub.add_parser("generate", help="generate text from a prompt",
                            description="Generate a continuation of a prompt, streamed to stdout."), generate)
    p.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    p.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                   help="structured output: the reply is JSON valid against the JSON schema in FILE")
    add_speculative_flags(p)
    add_generation_flags(p)

    p = runs(sub.add_parser("chat", help="chat in the terminal, streamed",
                            description="Interactive chat; the conversation is kept within the context window. "
                                        "Commands: /reset clears the history, /exit (or Ctrl-D) quits."), chat)
    p.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    p.add_argument("--system", default=None, help="system prompt")
    add_speculative_flags(p)
    add_generation_flags(p)

    add_serve_command(sub)

    export = sub.add_parser("export", help="export a checkpoint for another runtime (GGUF for llama.cpp)")
    formats = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    p = runs(formats.add_parser("gguf", help="write one GGUF file for llama.cpp",
                                description="Write the model and tokenizer of a Llama, Mistral, Mixtral or Qwen2 "
                                            "checkpoint as one GGUF file that llama.cpp loads."), export_gguf)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="HF-format model directory (with tokenizer), or a Hub id (org/name[@revision])")
    p.add_argument("--out", type=Path, required=True, help="GGUF file to write (e.g. model.gguf)")
    p.add_argument("--dtype", default="f16", choices=["f32", "f16"],
                   help="weight type; norms, biases and MoE routers stay f32 (default f16)")


def add_serve_command(sub: Subcommands) -> None:
    p = runs(sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                            description="Serve /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models "
                                        "and /health (FastAPI on uvicorn); concurrent requests are decoded in "
                                        "batches. With --prompt-lookup or --draft, a request for one completion "
                                        "(n=1, one prompt) sampled with temperature, top_p, top_k alone is decoded "
                                        "speculatively, on its own beside the batch (greedy replies unchanged, "
                                        "sampled ones from the same distribution); requests with response_format, "
                                        "tool_choice required or named, logit_bias, penalties, min_tokens, "
                                        "logprobs, n > 1 or several prompts are decoded in the batch as without a "
                                        "drafter. "
                                        "GET /metrics counts both kinds and the drafted and kept tokens."), serve)
    p.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; use 0.0.0.0 to accept other machines)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: no key)")
    p.add_argument("--model-name", default=None,
                   help="model id in the API (default: the checkpoint's folder name, or its Hub id)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="most sequences decoded together; later requests wait for a free row (default 16)")
    add_dtype_flag(p)
    add_quantize_flags(p)
    p.add_argument("--store", type=Path, default=None,
                   help="answer chat requests from this context store (`lmforge rag index`): the last user "
                        "message is searched for and the response lists its sources")
    p.add_argument("--rag-k", type=int, default=3, help="chunks retrieved per chat request with --store (default 3)")
    p.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                   help="refuse request bodies larger than this, unread (default 4 MiB)")
    p.add_argument("--embedding-model", default=None,
                   help="sentence-transformers directory for /v1/embeddings (and --store's searches; default: the "
                        "store's model, else all-MiniLM-L6-v2, loaded on the first embeddings request)")
    add_speculative_flags(p)
