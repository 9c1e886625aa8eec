"""`lmforge eval`: a checkpoint on a task file, a built-in task, or lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.cli.common import (
    CHECKPOINT_HELP, Subcommands, add_dtype_flag, add_sampling_flags, runs, sampling_params,
)


def evaluate(args: argparse.Namespace) -> None:
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
        from lmforge.eval.runner import answer_tokens, run_eval, summary
        from lmforge.world.tasks import register_tasks

        if args.tasks or args.include_path:
            raise ValueError("--tasks and --include-path go with --harness lm-eval")
        register_tasks(seed=args.world_seed, people=args.world_people)
        sampling = sampling_params(args, max_new_tokens=args.max_new_tokens or answer_tokens(args.cot))
        results = run_eval(args.checkpoint, args.task, shots=args.shots or 0, limit=args.limit, seed=args.seed,
                           cot=args.cot, chat=args.chat, sampling=sampling, batch_size=args.batch_size,
                           dtype=args.dtype)
        print(summary(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.out}")


def add_commands(sub: Subcommands) -> None:
    p = runs(sub.add_parser(
        "eval", help="evaluate a checkpoint on a task file, a built-in world task, or lm-eval tasks",
        description="Score a checkpoint on a JSONL task -- {prompt, answer}: exact match, F1, ROUGE, BLEU; "
                    "{question, choices, answer_index}: acc and acc_norm by log-likelihood; {text}: perplexity and "
                    "bits per byte -- or a built-in world task; or, with --harness lm-eval, on lm-evaluation-harness "
                    "tasks."), evaluate)
    p.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", metavar="FILE|NAME",
                        help="task JSONL (few-shot exemplars in NAME.exemplars.jsonl beside it), a folder with "
                             "test.jsonl (and train.jsonl exemplars), or a built-in task: world-qa-heldout, "
                             "world-qa-train, world-mc, world-bios")
    source.add_argument("--harness", choices=["lm-eval"], help="run lm-evaluation-harness tasks (see --tasks)")
    p.add_argument("--tasks", metavar="NAME[,NAME]", help="lm-eval task names (with --harness)")
    p.add_argument("--include-path", type=Path, metavar="DIR",
                   help="folder of extra lm-eval task YAML files (with --harness)")
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot exemplars per item (default 0; with --harness: the task's own)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (of each task)")
    p.add_argument("--seed", type=int, default=0, help="seed of exemplar draws and sampling (default 0)")
    p.add_argument("--cot", action="store_true",
                   help="chain of thought: add \"Let's think step by step.\"; the answer follows \"the answer is\"")
    p.add_argument("--chat", action="store_true",
                   help="prompts as user turns of the chat template, few-shot exemplars as earlier turns")
    add_sampling_flags(p, temperature=0.0, max_new_tokens=None, length_help="per answer (default 32, 256 with --cot)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="prompts, or questions with all their choices, per batch (default 32)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the built-in world (default 0, as the demo's)")
    p.add_argument("--world-people", type=int, default=100,
                   help="people in the built-in world (default 100, as the demo's)")
    add_dtype_flag(p)
    p.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                   help="also write the results, with every item, as JSON")
