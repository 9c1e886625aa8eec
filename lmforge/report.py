"""`report.md` beside a training run's outputs: what ran (configuration, hardware, time, tokens,
parameters), how it went (the loss curve and every validation record from `metrics.jsonl`), and
what came out (sample generations)."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel
from torch import nn


def hardware() -> str:
    """One line about the machine the run used."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def sample_generations(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
                       max_new_tokens: int = 48) -> list[tuple[str, str]]:
    """Greedy completions of tokenized `prompts` by `model`, decoded: a report's sample generations."""
    from lmforge.generate.engine import Engine
    from lmforge.generate.sampling import SamplingParams
    from lmforge.generate.text import complete, stop_token_ids

    if not prompts:
        return []
    was_training = model.training
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=stop_token_ids(model.config, tokenizer))
    completions = complete(Engine(model), tokenizer, [list(p) for p in prompts], params)
    model.train(was_training)
    return [(tokenizer.decode(list(p), skip_special_tokens=True), c.text) for p, c in zip(prompts, completions)]


def response_prompts(examples: Sequence[Any], n: int = 4) -> list[list[int]]:
    """The prompt part (every token before the first labelled one) of the first `n` chat examples."""
    from lmforge.train.losses import IGNORE

    prompts = []
    for example in examples[:n]:
        first = next((t for t, label in enumerate(example.labels) if label != IGNORE), None)
        if first is not None:
            prompts.append(example.input_ids[: first + 1])
    return prompts


def write_run_report(
    out_dir: str | Path, *, title: str, config: BaseModel, model: nn.Module, seconds: float,
    samples: Sequence[tuple[str, str]] = (), plot: str = "loss.png", tokens: int | None = None,
) -> Path:
    """Write `out_dir/report.md` from the run's configuration, model and `metrics.jsonl`."""
    out_dir = Path(out_dir)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()] \
        if (out_dir / "metrics.jsonl").is_file() else []
    train = [r for r in records if "loss" in r or "reward" in r]
    evals = [r for r in records if any(k.startswith("val_") for k in r)]
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    lines = [
        f"# {title}\n",
        f"{hardware()}. {seconds:.0f} s in all" + (f", {tokens:,} training tokens" if tokens else "") + ".\n",
        f"Parameters: {total:,} ({trainable:,} trained, {100 * trainable / max(1, total):.2f}%).\n",
    ]
    if train:
        last = train[-1]
        shown = {k: v for k, v in last.items() if isinstance(v, (int, float)) and k != "step"}
        lines.append(f"Last logged step {last['step']}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()) + ".\n")
    if (out_dir / plot).is_file():
        lines.append(f"![training curve]({plot})\n")
    if evals:
        keys = sorted({k for r in evals for k in r if k.startswith("val_")})
        lines += ["## Validation\n", "| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
        lines += [f"| {r['step']} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in evals]
        lines.append("")
    if samples:
        lines += ["## Samples\n", "| prompt | output |", "|---|---|"]
        lines += [f"| {table_cell(p)} | {table_cell(o)} |" for p, o in samples]
        lines.append("")
    lines += ["## Configuration\n", "```yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip(),
              "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_cell(text: str, limit: int = 200) -> str:
    """Text made safe for a markdown table cell, cut to `limit` characters."""
    text = text.replace("|", "\\|").replace("\n", " ").strip()
    return (text[:limit] + "…") if len(text) > limit else text or "(nothing)"
