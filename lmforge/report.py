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
        lines += [f"| {_cell(p)} | {_cell(o)} |" for p, o in samples]
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


def _cell(text: str, limit: int = 120) -> str:
    text = text.replace("|", "\\|").replace("\n", " ").strip()
    return (text[:limit] + "…") if len(text) > limit else text or "(nothing)"
