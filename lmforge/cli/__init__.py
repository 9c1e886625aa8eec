"""`lmforge <command>`: one module per command group, each adding its commands and their handlers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmforge.cli import demo, evaluate, models, planning, retrieval, training
from lmforge.cli.common import VERBOSE_HELP, CommandParser
from lmforge.console import hide_third_party_noise

GROUPS = (training, evaluate, models, retrieval, planning, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Build large language models end to end.")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        hide_third_party_noise()
    action = getattr(args, f"{args.command}_command", None)  # commands with sub-actions: tokenizer, rag, export, scaling
    name = f"{args.command} {action}" if action else args.command
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"lmforge {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a training command under torchrun joined a process group
            from lmforge.train.distributed import leave_process_group

            leave_process_group()
