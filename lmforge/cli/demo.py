"""`lmforge demo`: the whole pipeline on the built-in world."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import Subcommands, runs


def demo(args: argparse.Namespace) -> None:
    from lmforge.demo import run_demo

    run_demo(args.out, seed=args.seed, people=args.people, steps=args.steps, sft_steps=args.sft_steps,
             align_steps=args.align_steps, t5_steps=args.t5_steps)


def add_commands(sub: Subcommands) -> None:
    p = runs(sub.add_parser("demo", help="run the whole pipeline on the built-in world",
                            description="Run every stage that exists so far on built-in data and write a report."),
             demo)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--people", type=int, default=100, help="people in the generated world (default 100)")
    p.add_argument("--steps", type=int, default=600, help="pretraining steps (default 600)")
    p.add_argument("--sft-steps", type=int, default=300, help="LoRA instruction-tuning steps (default 300)")
    p.add_argument("--align-steps", type=int, default=150, help="steps of each reward model and of DPO (default 150)")
    p.add_argument("--t5-steps", type=int, default=300,
                   help="steps of each T5 instruction-tuning run, full and LoRA (default 300); its span-corruption "
                        "pretraining runs three times as many")
