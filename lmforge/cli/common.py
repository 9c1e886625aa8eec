"""What the command groups share: the parser class, the handler registry and the flags several commands take."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.generate.quantize import Quantization
    from lmforge.generate.sampling import SamplingParams
    from lmforge.generate.session import Session

Handler = Callable[[argparse.Namespace], "int | None"]
Subcommands = argparse._SubParsersAction  # what add_subparsers returns; argparse names no public type for it

VERBOSE_HELP = "also show other libraries' warnings and log messages (hidden by default)"
CHECKPOINT_HELP = ("HF-format model directory (with tokenizer) or PEFT adapter directory, or a Hugging Face Hub id "
                   "(org/name or org/name@revision; downloaded into the Hub cache)")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE_METHODS = ("int8", "int4")


class CommandParser(argparse.ArgumentParser):
    """A command's parser: every command also takes -v/--verbose, as `lmforge` itself does."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def runs(parser: argparse.ArgumentParser, handler: Handler) -> argparse.ArgumentParser:
    """Make `handler` the function that runs when `parser`'s command is given."""
    parser.set_defaults(handler=handler)
    return parser


def add_dtype_flag(p: argparse.ArgumentParser, help: str = "weight dtype (default: the checkpoint's)") -> None:
    p.add_argument("--dtype", default=None, choices=DTYPES, help=help)


def add_quantize_flags(p: argparse.ArgumentParser) -> None:
    """--quantize and --group-size: weight-only int8/int4 linear layers (`lmforge.generate.quantize`)."""
    p.add_argument("--quantize", default=None, choices=QUANTIZE_METHODS,
                   help="weight-only quantization of a decoder-only model's linear layers, on the CPU: int8 with one "
                        "scale per output feature, or int4 in groups of --group-size (its output head int8); "
                        "embeddings and norms stay in float; computes in bfloat16 unless --dtype says otherwise")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="with --quantize int4: input features per scale and zero, 32, 64 or 128 (default 32)")


def quantization(args: argparse.Namespace) -> Quantization | None:
    """--quantize and --group-size as a `Quantization`; None without --quantize."""
    if args.group_size is not None and args.quantize != "int4":
        raise ValueError("--group-size goes with --quantize int4 (int8 has one scale per output feature)")
    if args.quantize is None:
        return None
    from lmforge.generate.quantize import DEFAULT_GROUP_SIZE, Quantization

    return Quantization(args.quantize, DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size)


def load_session(args: argparse.Namespace) -> Session:
    """--checkpoint loaded as the generation flags ask: --dtype, --compile, --quantize."""
    from lmforge.generate.session import Session

    return Session.load(args.checkpoint, dtype=args.dtype, compile=args.compile, quantize=quantization(args))


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float,
                       max_new_tokens: int | None = 128, length_help: str = "(default 128)") -> None:
    """The flags of `SamplingParams`: --max-new-tokens, --temperature, --top-k, --top-p."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"most tokens to generate {length_help}")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature; 0 is greedy (default {temperature:g})")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= P")


def add_generation_flags(p: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    """The sampling flags and what generating from a checkpoint also takes: seed, stop texts, dtype, compile,
    quantization."""
    add_sampling_flags(p, temperature)
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    add_dtype_flag(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (slow first call; pays off on long or GPU runs)")
    add_quantize_flags(p)


def sampling_params(args: argparse.Namespace, **fields: Any) -> SamplingParams:
    """The sampling flags as `SamplingParams`, `fields` replacing some (a bad value: a one-line `ValueError`)."""
    from pydantic import ValidationError

    from lmforge.config import explain
    from lmforge.generate.sampling import SamplingParams

    try:
        return SamplingParams(**{"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                 "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed} | fields)
    except ValidationError as e:
        raise ValueError(explain(e, SamplingParams)) from None


def add_recipe_flags(p: argparse.ArgumentParser, example: str, overrides: str, resumable: bool = True) -> None:
    """--config FILE, key=value overrides and (for resumable stages) --resume."""
    p.add_argument("--config", type=Path, required=True, help=f"YAML recipe (see {example})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides)
    if resumable:
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
