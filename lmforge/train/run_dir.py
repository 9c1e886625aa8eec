"""A training run's directory, shared by the training loop and PPO: the metrics log
(`metrics.jsonl`, one JSON record per line with its `step`), rotated atomic checkpoints
(`checkpoints/step-N/`, resumable), plots of the metrics, and the final `report.md`: what ran
(configuration, hardware, time, tokens, parameters), how it went (the last training record, the
curve and every validation record) and what came out (sample generations). While a run is
`tracking`, each record and plot also goes to its experiment trackers (`lmforge.train.loggers`)."""

from __future__ import annotations

import json
import platform
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from pydantic import BaseModel
from torch import nn
from tqdm.auto import tqdm

from lmforge.checkpoint import atomic_dir
from lmforge.train.loggers import LoggerName, Tracker, open_trackers, scalars

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"  # beside the model's files in a checkpoint: optimizer, data position, RNG
LOSS_PANELS = {"loss": ("loss", "val_loss")}
T = TypeVar("T")


class RunDir:
    """The files of one run under `path` (and, while `tracking`, its experiment trackers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.trackers: list[Tracker] = []

    @contextmanager
    def tracking(self, names: list[LoggerName], config: BaseModel, resumed_at: int | None = None) -> Iterator[None]:
        """Send records and plots to the trackers `names` too while the context lasts (see `open_trackers`)."""
        with open_trackers(names, self.path, config, resumed_at) as self.trackers:
            try:
                yield
            finally:
                self.trackers = []

    # ---- the metrics log ---------------------------------------------------------------------

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to the metrics log (and send its metrics to the trackers)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        metrics = scalars(record)
        for tracker in self.trackers:
            tracker.log_metrics(metrics, record["step"])

    def records(self) -> list[dict[str, Any]]:
        """Every record of the metrics log, in order (none before the first is logged)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def trim_metrics_after(self, step: int) -> None:
        """Forget records a killed run logged after its last checkpoint (the resumed run logs them again)."""
        if self.metrics.is_file():
            lines = [line for line in self.metrics.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            self.metrics.write_text("".join(line + "\n" for line in kept))

    # ---- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, oldest first."""
        if not self.checkpoint_root.is_dir():
            return []
        return sorted(p for p in self.checkpoint_root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name))

    def save_checkpoint(self, step: int, write: Callable[[Path], None], keep_last: int) -> Path:
        """Write `checkpoints/step-N/` atomically with `write(directory)`, then keep the newest `keep_last`."""
        path = self.checkpoint_root / f"step-{step:06d}"
        with atomic_dir(path) as tmp:
            write(tmp)
        for old in self.checkpoints()[:-keep_last]:
            shutil.rmtree(old)
        return path

    def read_latest_checkpoint(self, read: Callable[[Path], T]) -> tuple[Path, T]:
        """The newest checkpoint and what `read` makes of it; a checkpoint that cannot be read is an
        error naming it and the intact one before it."""
        found = self.checkpoints()
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoints under {self.checkpoint_root}")
        path = found[-1]
        try:
            return path, read(path)
        except Exception as e:
            earlier = f"; the previous checkpoint {found[-2].name} is intact: delete {path.name} to resume from it" \
                if len(found) > 1 else ""
            raise ValueError(f"cannot resume from {path}: {e}{earlier}") from None

    def resumed(self, checkpoint: Path, step: int, unit: str = "step") -> None:
        """After resuming at `step` of `checkpoint`: drop the metrics logged after it and say so."""
        self.trim_metrics_after(step)
        tqdm.write(f"resumed from {checkpoint} at {unit} {step}")

    # ---- plots and the report ----------------------------------------------------------------

    def plot(self, name: str, panels: dict[str, tuple[str, ...]] = LOSS_PANELS) -> Path:
        """The metrics against steps as the PNG `name`: one panel per entry of `panels` (its y label),
        one line per metric key logged (losses on a log scale); the trackers get it at the last record's step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (label, keys) in zip(axes[0], panels.items()):
            for key in keys:
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:
                    ax.plot(*zip(*points), "o-" if key.startswith("val_") else "-", label=key.replace("_", " "))
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            if label == "loss":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        fig.savefig(self.path / name, dpi=100)
        plt.close(fig)
        for tracker in self.trackers:
            tracker.log_image(self.path / name, records[-1]["step"] if records else 0)
        return self.path / name

    def write_report(self, *, title: str, config: BaseModel, model: nn.Module, seconds: float,
                     samples: Sequence[tuple[str, str]] = (), plot: str = "loss.png",
                     tokens: int | None = None) -> Path:
        """Write `report.md` from the run's configuration, model and metrics log."""
        records = self.records()
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
            lines.append(f"Last logged step {last['step']}: "
                         + ", ".join(f"{k} {format_value(v)}" for k, v in shown.items()) + ".\n")
        if (self.path / plot).is_file():
            lines.append(f"![training curve]({plot})\n")
        if evals:
            keys = sorted({k for r in evals for k in r if k.startswith("val_")})
            lines += ["## Validation\n", "| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
            lines += [f"| {r['step']} | " + " | ".join(format_value(r.get(k)) for k in keys) + " |" for r in evals]
            lines.append("")
        if samples:
            lines += ["## Samples\n", "| prompt | output |", "|---|---|"]
            lines += [f"| {table_cell(p)} | {table_cell(o)} |" for p, o in samples]
            lines.append("")
        lines += ["## Configuration\n", "```yaml",
                  yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip(), "```", ""]
        path = self.path / "report.md"
        path.write_text("\n".join(lines))
        return path


def hardware() -> str:
    """One line about the machine the run used."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def sample_generations(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
                       max_new_tokens: int = 48) -> list[tuple[str, str]]:
    """Greedy completions of tokenized `prompts` by `model` (a decoder, or an encoder-decoder given its
    encoder inputs), decoded: a report's sample generations."""
    from lmforge.generate.engine import Engine, SamplingParams
    from lmforge.generate.seq2seq import Seq2SeqEngine
    from lmforge.generate.text import complete, stop_token_ids
    from lmforge.seq2seq import Seq2SeqLM

    if not prompts:
        return []
    was_training = model.training
    seq2seq = isinstance(model, Seq2SeqLM)
    stop = tuple(model.config.eos_token_ids) if seq2seq else stop_token_ids(model.config, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop)
    engine = Seq2SeqEngine(model) if seq2seq else Engine(model)
    completions = complete(engine, tokenizer, [list(p) for p in prompts], params)
    model.train(was_training)
    return [(tokenizer.decode(list(p), skip_special_tokens=True), c.text) for p, c in zip(prompts, completions)]


def format_value(value: Any) -> str:
    """A metric for a report: floats to 4 significant digits, None as nothing."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_cell(text: str, limit: int = 200) -> str:
    """Text made safe for a markdown table cell, cut to `limit` characters."""
    text = text.replace("|", "\\|").replace("\n", " ").strip()
    return (text[:limit] + "…") if len(text) > limit else text or "(nothing)"
