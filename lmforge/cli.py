"""`lmforge <command>`: argument parsing and one dispatch table to the stage entry functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.console import hide_third_party_noise

if TYPE_CHECKING:
    from lmforge.generate.sampling import SamplingParams

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str) -> Callable:
    def register(fn: Callable[[argparse.Namespace], int | None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


VERBOSE_HELP = "also show other libraries' warnings and log messages (hidden by default)"


class CommandParser(argparse.ArgumentParser):
    """A command's parser: every command also takes -v/--verbose, as `lmforge` itself does."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


CHECKPOINT_HELP = "HF-format model directory (with tokenizer), or a PEFT adapter directory"


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature; 0 is greedy (default {temperature:g})")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= P")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: the checkpoint's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (slow first call; pays off on long or GPU runs)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags of `add_sampling_flags` as `SamplingParams` (a bad value: a one-line `ValueError`)."""
    from pydantic import ValidationError

    from lmforge.config import explain
    from lmforge.generate.sampling import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    except ValidationError as e:
        raise ValueError(explain(e, SamplingParams)) from None


def add_retrieval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=3, help="chunks to retrieve (default 3)")
    p.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default="dense",
                   help="dense (embeddings), bm25 (words) or hybrid (both, fused by reciprocal rank) (default dense)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Build large language models end to end.")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = tok_sub.add_parser("train", help="train on text/JSONL/Parquet files or folders",
                               description="Train a byte-level BPE tokenizer and save it in Hugging Face format.")
    train.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH",
                       help=".txt, .jsonl (text field) or .parquet (text column) files, or folders of them")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    train.add_argument("--out", type=Path, required=True, help="output directory (tokenizer.json + config)")

    pre = sub.add_parser("pretrain", help="pretrain a model on a text corpus",
                         description="Pretrain with next-token prediction. Launch under torchrun for DDP/FSDP2 "
                                     "(train.strategy=ddp|fsdp).")
    pre.add_argument("--config", type=Path, required=True, help="YAML recipe (see configs/)")
    pre.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override recipe fields, dotted for sections (train.steps=100 data.seq_len=128)")
    pre.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")

    ft = sub.add_parser("sft", help="fine-tune on conversations: full, LoRA, QLoRA, prompt tuning, selective",
                        description="Supervised fine-tuning with the loss on assistant tokens only. The recipe's "
                                    "adapter.method picks full, lora, qlora, prompt or selective.")
    ft.add_argument("--config", type=Path, required=True, help="YAML recipe (see configs/sft-tiny.yaml)")
    ft.add_argument("overrides", nargs="*", metavar="key=value",
                    help="override recipe fields, dotted for sections (adapter.method=qlora train.steps=50)")
    ft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")

    rw = sub.add_parser("reward", help="train a reward model on preference pairs (Bradley–Terry)",
                        description="Train a reward model: the base's trunk with a scalar head, Bradley–Terry loss on "
                                    "chosen/rejected pairs (data.kind=safety for LLaMA-2's safety model). Writes a "
                                    "sequence-classification model to out_dir/model.")
    rw.add_argument("--config", type=Path, required=True, help="YAML recipe (see configs/reward-tiny.yaml)")
    rw.add_argument("overrides", nargs="*", metavar="key=value",
                    help="override recipe fields, dotted for sections (data.kind=safety margin=0.5 train.steps=50)")
    rw.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")

    rl = sub.add_parser("ppo", help="RLHF with PPO against a reward model (per-token KL penalty, LoRA policy)",
                        description="PPO from an SFT model: rollouts with the generation engine, reward-model "
                                    "score minus beta x KL to the reference (the policy with adapters disabled), "
                                    "GAE, clipped policy and value losses, adaptive KL.")
    rl.add_argument("--config", type=Path, required=True, help="YAML recipe (see configs/ppo-tiny.yaml)")
    rl.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields (ppo.iterations=50)")
    rl.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")

    dpo = sub.add_parser("dpo", help="align a model with preference pairs by DPO",
                         description="Direct Preference Optimization on {prompt, chosen, rejected} pairs. The reference "
                                     "is the starting model (its adapters disabled, or a frozen copy). Launch under "
                                     "torchrun for DDP/FSDP2.")
    dpo.add_argument("--config", type=Path, required=True, help="YAML recipe (see configs/dpo-tiny.yaml)")
    dpo.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override recipe fields, dotted for sections (beta=0.05 train.steps=50)")
    dpo.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")

    rs = sub.add_parser("rejection-sample", help="fine-tune on the best of K samples by a reward model (LLaMA-2)",
                        description="Per round: sample K responses per prompt, keep the one the reward model scores "
                                    "best, fine-tune on the kept ones with the SFT stage; the next round samples from "
                                    "the result. Per-round scores go to OUT_DIR/rounds.jsonl.")
    rs.add_argument("--config", type=Path, required=True, help="YAML recipe (see configs/rejection-tiny.yaml)")
    rs.add_argument("overrides", nargs="*", metavar="key=value",
                    help="override recipe fields, dotted for sections (rounds=3 sampling.k=8)")

    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint on a task file, a built-in world task, or lm-eval tasks",
        description="Score a checkpoint on a JSONL task -- {prompt, answer}: exact match, F1, ROUGE, BLEU; "
                    "{question, choices, answer_index}: acc and acc_norm by log-likelihood; {text}: perplexity and "
                    "bits per byte -- or a built-in world task; or, with --harness lm-eval, on lm-evaluation-harness "
                    "tasks.")
    ev.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", metavar="FILE|NAME",
                        help="task JSONL (few-shot exemplars in NAME.exemplars.jsonl beside it), a folder with "
                             "test.jsonl (and train.jsonl exemplars), or a built-in task: world-qa-heldout, "
                             "world-qa-train, world-mc, world-bios")
    source.add_argument("--harness", choices=["lm-eval"], help="run lm-evaluation-harness tasks (see --tasks)")
    ev.add_argument("--tasks", metavar="NAME[,NAME]", help="lm-eval task names (with --harness)")
    ev.add_argument("--include-path", type=Path, metavar="DIR",
                    help="folder of extra lm-eval task YAML files (with --harness)")
    ev.add_argument("--shots", type=int, default=None,
                    help="few-shot exemplars per item (default 0; with --harness: the task's own)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (of each task)")
    ev.add_argument("--seed", type=int, default=0, help="seed of exemplar draws and sampling (default 0)")
    ev.add_argument("--cot", action="store_true",
                    help="chain of thought: add \"Let's think step by step.\"; the answer follows \"the answer is\"")
    ev.add_argument("--chat", action="store_true",
                    help="prompts as user turns of the chat template, few-shot exemplars as earlier turns")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="most tokens per answer (default 32, 256 with --cot)")
    ev.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    ev.add_argument("--top-k", type=int, default=None, help="sample only from the K most likely tokens")
    ev.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= P")
    ev.add_argument("--batch-size", type=int, default=32,
                    help="prompts, or questions with all their choices, per batch (default 32)")
    ev.add_argument("--world-seed", type=int, default=0, help="seed of the built-in world (default 0, as the demo's)")
    ev.add_argument("--world-people", type=int, default=100,
                    help="people in the built-in world (default 100, as the demo's)")
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weight dtype (default: the checkpoint's)")
    ev.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                    help="also write the results, with every item, as JSON")

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base model",
                           description="Write the adapter's base model with the LoRA weights folded in, as an "
                                       "HF-format directory (with the base's tokenizer).")
    merge.add_argument("--checkpoint", type=Path, required=True, help="adapter directory (PEFT format)")
    merge.add_argument("--out", type=Path, required=True, help="output model directory")
    merge.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weight dtype of the merged model (default: the base's)")

    gen = sub.add_parser("generate", help="generate text from a prompt",
                         description="Generate a continuation of a prompt, streamed to stdout.")
    gen.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    add_sampling_flags(gen)

    chat = sub.add_parser("chat", help="chat in the terminal, streamed",
                          description="Interactive chat; the conversation is kept within the context window. "
                                      "Commands: /reset clears the history, /exit (or Ctrl-D) quits.")
    chat.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_flags(chat)

    srv = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                         description="Serve /v1/chat/completions, /v1/completions, /v1/models and /health "
                                     "(FastAPI on uvicorn); concurrent requests are decoded in batches.")
    srv.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1; use 0.0.0.0 to accept other machines)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 requests (default: no key)")
    srv.add_argument("--model-name", default=None, help="model id in the API (default: the checkpoint's folder name)")
    srv.add_argument("--max-batch-size", type=int, default=16,
                     help="most sequences decoded together; later requests wait for a free row (default 16)")
    srv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="weight dtype (default: the checkpoint's)")

    srv.add_argument("--store", type=Path, default=None,
                     help="answer chat requests from this context store (`lmforge rag index`): the last user "
                          "message is searched for and the response lists its sources")
    srv.add_argument("--rag-k", type=int, default=3, help="chunks retrieved per chat request with --store (default 3)")
    srv.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                     help="refuse request bodies larger than this, unread (default 4 MiB)")

    rag = sub.add_parser("rag", help="a context store: index documents, ask grounded questions",
                         description="Retrieval-augmented generation over a context store: chunk texts by tokens, "
                                     "embed them (sentence-transformers), keep vectors in faiss and texts in SQLite.")
    rag_sub = rag.add_subparsers(dest="rag_command", required=True, metavar="ACTION")
    index = rag_sub.add_parser("index", help="add or update documents in a store (created if absent)",
                               description="Index .txt/.md files (one document each), JSONL ('text' plus metadata, "
                                           "optional 'id') and folders of them. A document indexed before is skipped "
                                           "if unchanged and has its chunks replaced if changed.")
    index.add_argument("--store", type=Path, required=True, help="store directory")
    index.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="files or folders to index")
    index.add_argument("--embedding-model", type=Path, default=None,
                       help="a local sentence-transformers directory (default: all-MiniLM-L6-v2, bundled); "
                            "fixed when the store is created")
    index.add_argument("--chunk-tokens", type=int, default=128, help="chunk length in embedding-model tokens "
                                                                     "(new stores; default 128)")
    index.add_argument("--overlap", type=int, default=32, help="tokens shared by consecutive chunks (default 32)")
    index.add_argument("--index", choices=["flat", "hnsw"], default="flat",
                       help="faiss index of a new store: exact (flat) or approximate (hnsw) (default flat)")
    remove = rag_sub.add_parser("remove", help="delete documents (and their chunks) from a store")
    remove.add_argument("--store", type=Path, required=True, help="store directory")
    remove.add_argument("doc_ids", nargs="+", metavar="DOC_ID", help="document ids (see `lmforge rag list`)")
    listing = rag_sub.add_parser("list", help="list a store's documents")
    listing.add_argument("--store", type=Path, required=True, help="store directory")
    search = rag_sub.add_parser("search", help="print the chunks retrieved for a query")
    search.add_argument("--store", type=Path, required=True, help="store directory")
    search.add_argument("query", help="the search text")
    add_retrieval_flags(search)
    ask = rag_sub.add_parser("ask", help="answer a question from the store, citing numbered sources",
                             description="Retrieve the best chunks, put them in the prompt as numbered sources, "
                                         "generate, and print the answer with the sources it cites. --hops 2 searches "
                                         "again for the first answer (multi-hop questions).")
    ask.add_argument("--store", type=Path, required=True, help="store directory")
    ask.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    ask.add_argument("question", help="the question")
    ask.add_argument("--hops", type=int, default=1, help="retrieval rounds; each later one searches for the "
                                                         "previous answer (default 1)")
    add_retrieval_flags(ask)
    add_sampling_flags(ask, temperature=0.0)

    agent = sub.add_parser("agent", help="answer with a ReAct agent: search the store and calculate, step by step",
                           description="A Thought / Action / Observation loop: the model chooses search[query] "
                                       "(the store's best chunk) or calculator[expression] (arithmetic only) until it "
                                       "gives a Final Answer or runs out of steps. Prints the trace.")
    agent.add_argument("--store", type=Path, required=True, help="store directory")
    agent.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    agent.add_argument("question", help="the question")
    agent.add_argument("--max-steps", type=int, default=4, help="most assistant turns (default 4)")
    agent.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default="dense",
                       help="retrieval for the search tool (default dense)")
    add_sampling_flags(agent, temperature=0.0)

    export = sub.add_parser("export", help="export a checkpoint for another runtime (GGUF for llama.cpp)")
    export_sub = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    to_gguf = export_sub.add_parser("gguf", help="write one GGUF file for llama.cpp",
                                    description="Write the model and tokenizer of a Llama, Mistral, Mixtral or Qwen2 "
                                                "checkpoint as one GGUF file that llama.cpp loads.")
    to_gguf.add_argument("--checkpoint", type=Path, required=True, help="HF-format model directory (with tokenizer)")
    to_gguf.add_argument("--out", type=Path, required=True, help="GGUF file to write (e.g. model.gguf)")
    to_gguf.add_argument("--dtype", default="f16", choices=["f32", "f16"],
                         help="weight type; norms, biases and MoE routers stay f32 (default f16)")

    plan = sub.add_parser(
        "plan", help="parameters, FLOPs, memory and time of a training run; or the compute-optimal size",
        description="Plan training a preset or the model of a recipe: parameters, FLOPs, petaFLOP/s-days, memory per "
                    "device under DDP, FSDP and QLoRA, time at an MFU. With --flops C: the compute-optimal parameters "
                    "and tokens (Chinchilla).")
    what = plan.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="model preset (llama2-7b, llama3-8b, mistral-7b, mixtral-8x7b, ...)")
    what.add_argument("--config", type=Path, help="pretrain recipe (YAML), config.json or HF model directory")
    what.add_argument("--flops", type=float, metavar="C", help="compute budget in FLOPs: compute-optimal N and D")
    plan.add_argument("overrides", nargs="*", metavar="key=value",
                      help="recipe fields for a recipe, model fields otherwise (num_hidden_layers=40)")
    plan.add_argument("--gpus", type=int, default=None, help="devices (default: 1)")
    plan.add_argument("--gpu-mem", type=float, default=80.0, metavar="GB", help="memory per device in GiB (default 80)")
    plan.add_argument("--strategy", choices=["ddp", "fsdp", "qlora"], default=None,
                      help="the strategy the verdict is for; all three are shown (default: the recipe's, else ddp)")
    plan.add_argument("--tokens", type=float, default=None, metavar="D",
                      help="training tokens (default: the recipe's steps, else 20 per parameter)")
    plan.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: recipe, else context)")
    plan.add_argument("--micro-batch", type=int, default=None, help="sequences per device (default: recipe, else 1)")
    plan.add_argument("--recompute", choices=["none", "selective", "full"], default=None,
                      help="activations: none keeps attention scores; selective (default) as SDPA; "
                           "full = activation checkpointing (default: the recipe's)")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time (default 0.4)")
    plan.add_argument("--peak-flops", type=float, default=312e12,
                      help="peak FLOP/s per device (default 312e12, A100 bf16)")
    plan.add_argument("--lora-rank", type=int, default=8, help="QLoRA adapter rank (default 8)")

    scaling = sub.add_parser("scaling", help="IsoFLOP sweeps and scaling-law fits")
    scaling_sub = scaling.add_subparsers(dest="scaling_command", required=True, metavar="ACTION")
    sweep = scaling_sub.add_parser(
        "sweep", help="train every model size at every compute budget",
        description="Train each model of the sweep recipe at each budget C on C / 6N tokens, one pretrain run each; "
                    "finished runs are kept, unfinished ones start over.")
    sweep.add_argument("--config", type=Path, required=True, help="sweep recipe (see configs/scaling-sweep.yaml)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields (flops=[1e10,1e11])")
    fit = scaling_sub.add_parser(
        "fit", help="fit L(N, D) to a sweep's runs; plot and report",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla's approach 3) to the finished runs and write "
                    "scaling.png and report.md into RUNS_DIR.")
    fit.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", help="the sweep's out_dir")

    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in world",
                          description="Run every stage that exists so far on built-in data and write a report.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--people", type=int, default=100, help="people in the generated world (default 100)")
    demo.add_argument("--steps", type=int, default=600, help="pretraining steps (default 600)")
    demo.add_argument("--sft-steps", type=int, default=300, help="LoRA instruction-tuning steps (default 300)")
    demo.add_argument("--align-steps", type=int, default=150,
                      help="steps of each reward model and of DPO (default 150)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        hide_third_party_noise()
    action = getattr(args, f"{args.command}_command", None)  # commands with sub-actions: tokenizer, export, scaling
    key = f"{args.command} {action}" if action else args.command
    try:
        return COMMANDS[key](args) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"lmforge {key}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a training command under torchrun joined a process group
            from lmforge.train.distributed import leave_process_group

            leave_process_group()


@command("tokenizer train")
def _tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"tokenizer with {tokenizer.vocab_size} tokens written to {args.out}")


@command("pretrain")
def _pretrain(args: argparse.Namespace) -> None:
    from lmforge.train.pretrain import load_pretrain_config, pretrain

    model_dir = pretrain(load_pretrain_config(args.config, args.overrides), resume=args.resume)
    print(f"model written to {model_dir}")


@command("sft")
def _sft(args: argparse.Namespace) -> None:
    from lmforge.train.sft import load_sft_config, sft

    out = sft(load_sft_config(args.config, args.overrides), resume=args.resume)
    print(f"{'adapter' if out.name == 'adapter' else 'model'} written to {out}")


@command("reward")
def _reward(args: argparse.Namespace) -> None:
    from lmforge.align.reward import load_reward_config, train_reward

    out = train_reward(load_reward_config(args.config, args.overrides), resume=args.resume)
    print(f"reward model written to {out}")


@command("ppo")
def _ppo(args: argparse.Namespace) -> None:
    from lmforge.align.ppo import load_ppo_config, ppo

    print(f"adapter written to {ppo(load_ppo_config(args.config, args.overrides), resume=args.resume)}")


@command("dpo")
def _dpo(args: argparse.Namespace) -> None:
    from lmforge.align.dpo import load_dpo_config, train_dpo

    out = train_dpo(load_dpo_config(args.config, args.overrides), resume=args.resume)
    print(f"{'adapter' if out.name == 'adapter' else 'model'} written to {out}")


@command("rejection-sample")
def _rejection_sample(args: argparse.Namespace) -> None:
    from lmforge.align.rejection import load_rejection_config, rejection_sample

    config = load_rejection_config(args.config, args.overrides)
    out = rejection_sample(config)
    print(f"{'adapter' if out.name == 'adapter' else 'model'} written to {out}; "
          f"scores per round in {config.out_dir / 'rounds.jsonl'}")


@command("eval")
def _eval(args: argparse.Namespace) -> None:
    import json

    if args.harness:
        from lmforge.eval.harness import harness_table, run_harness

        if not args.tasks:
            raise ValueError("--harness lm-eval needs --tasks NAME[,NAME]")
        if args.cot:
            raise ValueError("--cot applies to --task; lm-eval tasks define their own prompts")
        results = run_harness(args.checkpoint, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                              shots=args.shots, limit=args.limit, batch_size=args.batch_size, chat=args.chat,
                              seed=args.seed, dtype=args.dtype)
        print(harness_table(results))
    else:
        from lmforge.eval.runner import run_eval, summary

        if args.tasks or args.include_path:
            raise ValueError("--tasks and --include-path go with --harness lm-eval")
        results = run_eval(args.checkpoint, args.task, shots=args.shots or 0, limit=args.limit, seed=args.seed,
                           cot=args.cot, chat=args.chat, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           batch_size=args.batch_size, world_seed=args.world_seed, world_people=args.world_people,
                           dtype=args.dtype)
        print(summary(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.out}")


@command("merge")
def _merge(args: argparse.Namespace) -> None:
    from lmforge.peft.adapters import merge_and_save

    print(f"merged model written to {merge_and_save(args.checkpoint, args.out, dtype=args.dtype)}")


@command("generate")
def _generate(args: argparse.Namespace) -> None:
    from lmforge.generate.session import Session

    session = Session.load(args.checkpoint, dtype=args.dtype, compile=args.compile)
    params = session.sampling(sampling_params(args))
    if args.chat:
        prompt = session.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = session.encode(args.prompt)
    for delta in session.stream(prompt, params, args.stop):
        print(delta, end="", flush=True)
    print()


@command("chat")
def _chat(args: argparse.Namespace) -> None:
    from lmforge.generate.session import Session

    session = Session.load(args.checkpoint, dtype=args.dtype, compile=args.compile)
    session.chat_loop(session.sampling(sampling_params(args)), system=args.system, stop=args.stop)


@command("serve")
def _serve(args: argparse.Namespace) -> None:
    from lmforge.serve.server import serve

    serve(str(args.checkpoint), host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
          dtype=args.dtype, max_batch_size=args.max_batch_size, store=args.store, rag_k=args.rag_k,
          max_request_bytes=args.max_request_bytes)


@command("rag index")
def _rag_index(args: argparse.Namespace) -> None:
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


@command("rag remove")
def _rag_remove(args: argparse.Namespace) -> None:
    from lmforge.rag.store import Store

    with Store.open(args.store) as store:
        for doc_id in args.doc_ids:
            print(f"{doc_id}: {store.remove(doc_id)} chunks removed")


@command("rag list")
def _rag_list(args: argparse.Namespace) -> None:
    from lmforge.rag.store import Store

    with Store.open(args.store) as store:
        for doc_id in store.documents():
            print(doc_id)


@command("rag search")
def _rag_search(args: argparse.Namespace) -> None:
    from lmforge.rag.store import Store

    with Store.open(args.store) as store:
        for hit in store.search(args.query, args.k, args.mode):
            print(f"{hit.rank}. {hit.doc_id} (score {hit.score:.3f})\n   {' '.join(hit.text.split())}")


@command("rag ask")
def _rag_ask(args: argparse.Namespace) -> None:
    from lmforge.generate.session import Session
    from lmforge.rag.answer import answer_questions
    from lmforge.rag.store import Store

    session = Session.load(args.checkpoint, dtype=args.dtype, compile=args.compile)
    params = session.sampling(sampling_params(args))
    with Store.open(args.store) as store:
        [answer] = answer_questions(session, store, [args.question], params, k=args.k, mode=args.mode,
                                    hops=args.hops)
    print(answer.answer or "(no answer)")
    print("\nSources:")
    cited = {hit.chunk_id for hit in answer.cited()}
    for number, hit in enumerate(answer.sources, 1):
        mark = "*" if hit.chunk_id in cited else " "
        print(f"{mark}[{number}] {hit.doc_id} (score {hit.score:.3f}): {' '.join(hit.text.split())[:160]}")
    if not cited:
        print("(the answer cites none of them)")


@command("agent")
def _agent(args: argparse.Namespace) -> None:
    from lmforge.generate.session import Session
    from lmforge.rag.agent import run_agents
    from lmforge.rag.answer import agent_tools
    from lmforge.rag.store import Store

    session = Session.load(args.checkpoint, dtype=args.dtype, compile=args.compile)
    params = session.sampling(sampling_params(args))
    with Store.open(args.store) as store:
        [trace] = run_agents([args.question], lambda chats: session.replies(chats, params),
                             agent_tools(store, args.mode), max_steps=args.max_steps)
    print(trace.render())
    if trace.answer is None:
        print(f"(no final answer within {args.max_steps} steps)")


@command("export gguf")
def _export_gguf(args: argparse.Namespace) -> None:
    from lmforge.export.gguf import export_gguf

    export_gguf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"GGUF ({args.dtype}) written to {args.out}")


@command("plan")
def _plan(args: argparse.Namespace) -> None:
    from lmforge import scaling

    if args.flops is not None:
        if args.overrides:
            raise ValueError("--flops takes no key=value overrides")
        print(scaling.render_compute_optimal(scaling.compute_optimal(args.flops)))
        return
    print(scaling.render_plan(scaling.plan(
        preset=args.preset, config=args.config, overrides=args.overrides, gpus=args.gpus, gpu_mem=args.gpu_mem,
        strategy=args.strategy, tokens=args.tokens, seq_len=args.seq_len, micro_batch=args.micro_batch,
        recompute=args.recompute, mfu=args.mfu, peak_flops=args.peak_flops, lora_rank=args.lora_rank)))


@command("scaling sweep")
def _scaling_sweep(args: argparse.Namespace) -> None:
    from lmforge.scaling.isoflop import sweep

    runs_dir = sweep(args.config, args.overrides)
    print(f"runs in {runs_dir}; fit them with: lmforge scaling fit {runs_dir}")


@command("scaling fit")
def _scaling_fit(args: argparse.Namespace) -> None:
    from lmforge.scaling.isoflop import fit

    result = fit(args.runs_dir)
    law = result.law
    print(f"{len(result.runs)} runs: L(N, D) = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}; "
          f"N_opt = {law.G:.3g} (C/6)^{law.params_exponent:.3f}")
    print(f"report {result.report}, plot {result.plot}")


@command("demo")
def _demo(args: argparse.Namespace) -> None:
    from lmforge.demo import run_demo

    run_demo(args.out, seed=args.seed, people=args.people, steps=args.steps, sft_steps=args.sft_steps,
             align_steps=args.align_steps)


if __name__ == "__main__":
    sys.exit(main())
