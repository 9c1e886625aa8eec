"""What the command groups share: the parser class, the handler registry and the flags several commands take."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.generate.quantize import Quantization
    from lmforge.generate.sampling import SamplingParams
    from lmforge.generate.session import Session
    from lmforge.generate.speculative import Drafter, SpeculativeEngine

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
                   help="compile the decode step: on CPU one sequence of a Llama-family model (Llama, Mistral, "
                        "Qwen2/3, Gemma, Phi-3) decodes through lmforge's C step, built once per machine with the "
                        "system C compiler; other models and batches run a torch.compile'd step, compiled on the "
                        "first call per batch size (about a minute), one fused graph (CPU) or CUDA graph (GPU). "
                        "Either way without eager PyTorch's per-operator overhead")
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


def add_speculative_flags(p: argparse.ArgumentParser) -> None:
    """--prompt-lookup K, or --draft CHECKPOINT with --draft-tokens K: speculative decoding's drafter."""
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="K",
                   help="speculative decoding with prompt lookup: draft up to K tokens that followed the latest "
                        "n-gram's earlier occurrence in the prompt and the text so far (pays off when the answer "
                        "copies from the prompt); greedy output is unchanged, sampling keeps its distribution")
    p.add_argument("--draft", type=Path, default=None, metavar="CHECKPOINT",
                   help="speculative decoding with a smaller draft model of the same tokenizer (loaded with the "
                        "same --dtype and --quantize)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="with --draft: tokens the draft model proposes per check (default 4)")


def speculating(args: argparse.Namespace) -> bool:
    """Whether --prompt-lookup or --draft asks for speculative decoding (a bad combination: a `ValueError`)."""
    if args.prompt_lookup is not None and args.draft is not None:
        raise ValueError("--prompt-lookup and --draft are two kinds of drafter: choose one")
    if args.draft_tokens is not None and args.draft is None:
        raise ValueError("--draft-tokens goes with --draft (--prompt-lookup K sets its own draft length)")
    return args.prompt_lookup is not None or args.draft is not None


def drafter(args: argparse.Namespace, session: Session) -> Drafter | None:
    """The drafter --prompt-lookup or --draft asks for, checked against `session`'s model; None without them."""
    if not speculating(args):
        return None
    if session.encoder_decoder or getattr(args, "compile", False):
        raise ValueError("speculative decoding runs a decoder-only model, without --compile")
    from lmforge.generate.session import Session
    from lmforge.generate.speculative import DraftModel, PromptLookup

    if args.prompt_lookup is not None:
        return PromptLookup(k=args.prompt_lookup)
    draft = Session.load(args.draft, dtype=args.dtype, quantize=quantization(args))
    if draft.tokenizer.vocab_size != session.tokenizer.vocab_size or draft.encoder_decoder:
        raise ValueError(f"{args.draft}: a draft model needs the same tokenizer as {args.checkpoint} "
                         f"({draft.tokenizer.vocab_size} tokens vs {session.tokenizer.vocab_size})")
    if draft.context < session.context:
        raise ValueError(f"{args.draft}: a draft model needs at least the context of {args.checkpoint} "
                         f"({draft.context} tokens vs {session.context})")
    return DraftModel(draft.model, k=4 if args.draft_tokens is None else args.draft_tokens)


def speculative_engine(args: argparse.Namespace, session: Session) -> SpeculativeEngine | None:
    """With --prompt-lookup or --draft, the session decodes speculatively (its engine replaced); else None."""
    if (chosen := drafter(args, session)) is None:
        return None
    from lmforge.generate.speculative import SpeculativeEngine

    engine = SpeculativeEngine(session.model, chosen)
    session.engine = engine  # type: ignore[assignment]  # `Engine.stream`'s interface, which sessions use
    return engine


def report_speculation(engine: SpeculativeEngine) -> dict[str, Any]:
    """Speculative decoding's figures, printed on stderr and returned."""
    stats = engine.stats
    print(f"speculative decoding: {stats.accepted} of {stats.drafted} drafted tokens kept "
          f"({stats.acceptance_rate:.0%}), {stats.generated} tokens in {stats.verifications} forward passes",
          file=sys.stderr)
    return {**dataclasses.asdict(stats), "acceptance_rate": stats.acceptance_rate}


def add_recipe_flags(p: argparse.ArgumentParser, example: str, overrides: str, resumable: bool = True) -> None:
    """--config FILE, key=value overrides and (for resumable stages) --resume."""
    p.add_argument("--config", type=Path, required=True, help=f"YAML recipe (see {example})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides)
    if resumable:
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
