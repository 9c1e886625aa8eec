"""Planning commands: `lmforge plan` (size, FLOPs, memory, time) and `lmforge scaling sweep|fit`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import Subcommands, runs


def plan(args: argparse.Namespace) -> None:
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


def sweep(args: argparse.Namespace) -> None:
    from lmforge.scaling.isoflop import sweep

    runs_dir = sweep(args.config, args.overrides)
    print(f"runs in {runs_dir}; fit them with: lmforge scaling fit {runs_dir}")


def fit(args: argparse.Namespace) -> None:
    from lmforge.scaling.isoflop import fit

    result = fit(args.runs_dir)
    law = result.law
    print(f"{len(result.runs)} runs: L(N, D) = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}; "
          f"N_opt = {law.G:.3g} (C/6)^{law.params_exponent:.3f}")
    print(f"report {result.report}, plot {result.plot}")


def add_commands(sub: Subcommands) -> None:
    add_plan_command(sub)
    scaling = sub.add_parser("scaling", help="IsoFLOP sweeps and scaling-law fits")
    actions = scaling.add_subparsers(dest="scaling_command", required=True, metavar="ACTION")
    p = runs(actions.add_parser(
        "sweep", help="train every model size at every compute budget",
        description="Train each model of the sweep recipe at each budget C on C / 6N tokens, one pretrain run each; "
                    "finished runs are kept, unfinished ones start over."), sweep)
    p.add_argument("--config", type=Path, required=True, help="sweep recipe (see configs/scaling-sweep.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields (flops=[1e10,1e11])")
    p = runs(actions.add_parser(
        "fit", help="fit L(N, D) to a sweep's runs; plot and report",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla's approach 3) to the finished runs and write "
                    "scaling.png and report.md into RUNS_DIR."), fit)
    p.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", help="the sweep's out_dir")


def add_plan_command(sub: Subcommands) -> None:
    p = runs(sub.add_parser(
        "plan", help="parameters, FLOPs, memory and time of a training run; or the compute-optimal size",
        description="Plan training a preset or the model of a recipe: parameters, FLOPs, petaFLOP/s-days, memory per "
                    "device under DDP, FSDP and QLoRA, time at an MFU. With --flops C: the compute-optimal parameters "
                    "and tokens (Chinchilla)."), plan)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="model preset (llama2-7b, llama3-8b, mistral-7b, mixtral-8x7b, ...)")
    what.add_argument("--config", type=Path, help="pretrain recipe (YAML), config.json or HF model directory")
    what.add_argument("--flops", type=float, metavar="C", help="compute budget in FLOPs: compute-optimal N and D")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe fields for a recipe, model fields otherwise (num_hidden_layers=40)")
    p.add_argument("--gpus", type=int, default=None, help="devices (default: 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GB", help="memory per device in GiB (default 80)")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "qlora"], default=None,
                   help="the strategy the verdict is for; all three are shown (default: the recipe's, else ddp)")
    p.add_argument("--tokens", type=float, default=None, metavar="D",
                   help="training tokens (default: the recipe's steps, else 20 per parameter)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: recipe, else context)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per device (default: recipe, else 1)")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default=None,
                   help="activations: none keeps attention scores; selective (default) as SDPA; "
                        "full = activation checkpointing (default: the recipe's)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time (default 0.4)")
    p.add_argument("--peak-flops", type=float, default=312e12,
                   help="peak FLOP/s per device (default 312e12, A100 bf16)")
    p.add_argument("--lora-rank", type=int, default=8, help="QLoRA adapter rank (default 8)")
