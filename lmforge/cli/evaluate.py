"""`lmforge eval`: a checkpoint on a task file, a built-in task, or lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.cli.common import (
    CHECKPOINT_HELP, Subcommands, add_dtype_flag, add_quantize_flags, add_sampling_flags, add_speculative_flags,
    quantization, report_speculation, runs, sampling_params, speculating, speculative_engine,
)

if TYPE_CHECKING:
    from lmforge.eval.tasks import Task
    from lmforge.generate.session import Session
    from lmforge.generate.speculative import SpeculativeEngine


def evaluate(args: argparse.Namespace) -> None:
    speculative: SpeculativeEngine | None = None
    if args.harness:
        from lmforge.eval.harness import harness_table, run_harness

        if not args.tasks:
            raise ValueError("--harness lm-eval needs --tasks NAME[,NAME]")
        if args.cot:
            raise ValueError("--cot applies to --task; lm-eval tasks define their own prompts")
        if args.metrics or args.swaps:
            raise ValueError("--metrics and --swaps apply to --task")
        model: Any = args.checkpoint
        if speculating(args):  # generate_until requests decode speculatively; log-likelihoods are scored as always
            from lmforge.generate.session import Session

            model = Session.load(args.checkpoint, dtype=args.dtype, quantize=quantization(args))
            speculative = speculative_engine(args, model)
        results = run_harness(model, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                              shots=args.shots, limit=args.limit, batch_size=args.batch_size, chat=args.chat,
                              seed=args.seed, dtype=args.dtype, quantize=quantization(args))
        print(harness_table(results))
    else:
        from lmforge.eval.runner import answer_tokens, evaluate as evaluate_task, summary
        from lmforge.world.tasks import register_tasks

        if args.tasks or args.include_path:
            raise ValueError("--tasks and --include-path go with --harness lm-eval")
        register_tasks(seed=args.world_seed, people=args.world_people)
        sampling = sampling_params(args, max_new_tokens=args.max_new_tokens or answer_tokens(args.cot))
        options = dict(shots=args.shots or 0, limit=args.limit, seed=args.seed, cot=args.cot, chat=args.chat,
                       sampling=sampling, batch_size=args.batch_size, dtype=args.dtype,
                       quantize=quantization(args), split=args.split, columns=args.columns)
        if args.metrics:
            results, speculative = holistic(args, options)
        else:
            if args.swaps:
                raise ValueError("--swaps goes with --metrics (fairness)")
            task, session, speculative = task_and_session(args, options)
            results = {"checkpoint": str(args.checkpoint), **evaluate_task(session, task, **options)}
        print(summary(results))
        if "holistic" in results:
            from lmforge.eval.report import summary_lines

            print("\n".join(summary_lines(results["holistic"])))
    if speculative is not None:
        results["speculative_decoding"] = report_speculation(speculative)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.out}")


def field_mapping(text: str) -> dict[str, str]:
    """`prompt=question,answer=label` as {"prompt": "question", "answer": "label"}."""
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    if not pairs or any(not field.strip() or not eq or not column.strip() for field, eq, column in pairs):
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=COLUMN[,FIELD=COLUMN]")
    return {field.strip(): column.strip() for field, _, column in pairs}


def holistic(args: argparse.Namespace, options: dict[str, Any]) -> tuple[dict[str, Any], SpeculativeEngine | None]:
    """The task under the chosen metric groups, and the speculative engine it was decoded with (None without);
    the report and its plots go beside the results file."""
    from lmforge.eval.holistic import holistic_eval, parse_groups
    from lmforge.eval.perturb import swap_terms
    from lmforge.eval.report import write_holistic_report
    from lmforge.io import read_json

    groups = parse_groups(args.metrics)
    swaps = read_json(args.swaps) if args.swaps else None
    if swaps is not None:
        if not (isinstance(swaps, dict) and swaps and all(isinstance(v, str) for v in swaps.values())):
            raise ValueError(f"{args.swaps}: expected a non-empty JSON object of term -> replacement strings")
        try:
            swap_terms("", swaps)  # checks the keys
        except ValueError as e:
            raise ValueError(f"{args.swaps}: {e}") from None
    task, session, speculative = task_and_session(args, options)
    results = {"checkpoint": str(args.checkpoint), **holistic_eval(session, task, groups, swaps=swaps, **options)}
    args.out = args.out or Path("runs") / "eval" / task.name / "results.json"
    report = write_holistic_report(results, args.out.parent)
    print(f"report written to {report}")
    return results, speculative


def task_and_session(args: argparse.Namespace,
                     options: dict[str, Any]) -> tuple[Task, Session, SpeculativeEngine | None]:
    """--task and --checkpoint loaded as `options` ask (their loading options taken out of them), and the
    speculative engine the session decodes with under --prompt-lookup or --draft (None without), which only
    generation tasks take."""
    from lmforge.eval.runner import load_task
    from lmforge.generate.session import Session

    task = load_task(args.task, split=options.pop("split"), columns=options.pop("columns"))
    if speculating(args) and task.kind != "generation":
        raise ValueError(f"--prompt-lookup and --draft speed up generation; {task.name} is a {task.kind} task, "
                         "scored by log-likelihood without generating")
    session = Session.load(args.checkpoint, dtype=options.pop("dtype"), quantize=options.pop("quantize"))
    return task, session, speculative_engine(args, session)


def add_commands(sub: Subcommands) -> None:
    p = runs(sub.add_parser(
        "eval", help="evaluate a checkpoint on a task file, a built-in world task, or lm-eval tasks",
        description="Score a checkpoint on a JSONL task -- {prompt, answer}: exact match, F1, ROUGE, BLEU; "
                    "{question, choices, answer_index}: acc and acc_norm by log-likelihood; {text}: perplexity and "
                    "bits per byte -- or a built-in world task; or, with --harness lm-eval, on lm-evaluation-harness "
                    "tasks. With --prompt-lookup or --draft, answers are generated speculatively, one prompt after "
                    "another (greedy answers unchanged): a --task that is scored by log-likelihood (multiple choice, "
                    "perplexity) is refused with them; with --harness they apply to the tasks' generate_until "
                    "requests."), evaluate)
    p.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", metavar="FILE|NAME",
                        help="task JSONL (few-shot exemplars in NAME.exemplars.jsonl beside it), a folder with "
                             "test.jsonl (and train.jsonl exemplars), or a built-in task: world-qa-heldout, "
                             "world-qa-unseen, world-qa-train, world-mc, world-bios")
    source.add_argument("--harness", choices=["lm-eval"], help="run lm-evaluation-harness tasks (see --tasks)")
    p.add_argument("--tasks", metavar="NAME[,NAME]", help="lm-eval task names (with --harness)")
    p.add_argument("--include-path", type=Path, metavar="DIR",
                   help="folder of extra lm-eval task YAML files (with --harness)")
    p.add_argument("--split", default="test",
                   help="with --task hf:org/name[:config][@revision] (a Hub dataset): the split to evaluate "
                        "(default test; few-shot exemplars come from its train split)")
    p.add_argument("--columns", type=field_mapping, default={}, metavar="FIELD=COLUMN[,FIELD=COLUMN]",
                   help="read a task's fields from columns of other names, e.g. prompt=question,answer=label")
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
    p.add_argument("--metrics", metavar="all|GROUP[,GROUP]",
                   help="holistic evaluation (with --task): all, or some of accuracy, calibration (ECE, Brier), "
                        "selective (accuracy-coverage, confident wrong answers), robustness (typos, casing, "
                        "whitespace, synonyms, distractor), fairness (counterfactual name/pronoun swaps), toxicity, "
                        "efficiency; writes report.md and plots beside --out (default runs/eval/TASK/results.json)")
    p.add_argument("--swaps", type=Path, metavar="FILE.json",
                   help="fairness: a JSON object of term -> replacement (default: the task's own swaps, else "
                        "pronouns)")
    add_speculative_flags(p)
    add_dtype_flag(p)
    add_quantize_flags(p)
    p.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                   help="also write the results, with every item, as JSON")
