"""`lmforge scaling sweep` and `lmforge scaling fit`: IsoFLOP runs of small models, then L(N, D).

A sweep trains every model size at every compute budget C for D = C / (6N) tokens, N being the
non-embedding parameters (Kaplan et al. 2020), each run an ordinary `pretrain` with its cosine
schedule spanning its own steps (Hoffmann et al. 2022). Runs share one tokenized corpus and
validation split; each run's loss is its final validation loss. `fit` fits
L(N, D) = E + A/N^α + B/D^β to them (`lmforge.scaling.fitting`), plots the IsoFLOP curves with the
compute-optimal frontier, and writes report.md beside the plot.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from tqdm.auto import tqdm

from lmforge.config import load_recipe
from lmforge.console import Progress
from lmforge.presets import preset
from lmforge.scaling.fitting import fit_law
from lmforge.scaling.law import CHINCHILLA, ScalingLaw, count
from lmforge.train.pretrain import PretrainConfig, pretrain
from lmforge.train.run_dir import RunDir

RUN_FILE = "run.json"
PLOT_FILE = "scaling.png"
REPORT_FILE = "report.md"


class SweepConfig(BaseModel):
    """An IsoFLOP sweep: `models` x `flops`, each run the `pretrain` recipe with that size and budget."""

    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    pretrain: dict[str, Any] = Field(description="pretrain recipe (model, data, train) shared by the runs")
    models: dict[str, dict[str, Any]] = Field(min_length=1, description="name -> model fields (preset overrides)")
    flops: list[PositiveFloat] = Field(min_length=1, description="compute budgets C = 6ND")
    min_steps: int = Field(1, ge=1, description="shorter runs are skipped: their loss is mostly warmup")


@dataclass(frozen=True)
class RunSpec:
    name: str
    model: str
    flops: float  # the budget C
    params: int  # non-embedding N
    tokens: int  # D actually trained: steps x tokens per step
    steps: int


@dataclass(frozen=True)
class Run:
    """A finished run: N, D, its budget and final validation loss."""

    name: str
    params: int
    tokens: int
    flops: float
    loss: float


@dataclass(frozen=True)
class ScalingFit:
    law: ScalingLaw
    objective: float
    runs: list[Run]
    unfinished: list[str]
    plot: Path
    report: Path


def budget_name(flops: float) -> str:
    """3e10 -> '3e10'."""
    return f"{flops:.2g}".replace("e+", "e")


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    return load_recipe(SweepConfig, path, overrides)


def plan_runs(config: SweepConfig) -> tuple[list[tuple[RunSpec, PretrainConfig]], list[str]]:
    """Each run's spec and pretrain config; the (model, budget) pairs too short to train, with why."""
    if "out_dir" in config.pretrain:
        raise ValueError("pretrain.out_dir: runs are written under the sweep's out_dir; remove it")
    runs, skipped = [], []
    for model, fields in config.models.items():
        recipe = dict(config.pretrain)
        model_spec = dict(recipe.get("model") or {})
        model_spec["overrides"] = {**(model_spec.get("overrides") or {}), **fields}
        recipe["model"] = model_spec
        base = PretrainConfig.model_validate({**recipe, "out_dir": config.out_dir})
        if base.model.init_from is not None or base.model.preset is None:
            raise ValueError("pretrain.model: a sweep trains its models from scratch: give a preset, not init_from")
        params = preset(base.model.preset, **base.model.overrides).num_parameters(embeddings=False)
        step_tokens = base.train.micro_batch_size * base.train.grad_accum * base.data.seq_len
        for flops in sorted(config.flops):
            name = f"{model}-C{budget_name(flops)}"
            steps = round(flops / (6 * params) / step_tokens)
            if steps < max(config.min_steps, base.train.warmup_steps + 1):
                skipped.append(f"{name}: {steps} steps of {step_tokens} tokens, fewer than min_steps "
                               f"{config.min_steps} or within the {base.train.warmup_steps} warmup steps")
                continue
            train = base.train.model_copy(update=dict(steps=steps, eval_every=steps, save_every=steps))
            run = base.model_copy(update=dict(out_dir=config.out_dir / name, train=train))
            runs.append((RunSpec(name, model, flops, params, steps * step_tokens, steps), run))
    return runs, skipped


def sweep(config_path: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Run (or finish) the sweep of `config_path`; returns its runs directory, for `fit`."""
    config = load_sweep_config(config_path, overrides)
    runs, skipped = plan_runs(config)
    if not runs:
        raise ValueError("no run left to train: every budget is too small for its model; " + "; ".join(skipped))
    out = config.out_dir
    shared = out / "data"  # tokenized once: every run links its data directory here
    shared.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(
        {"runs": [asdict(spec) for spec, _ in runs], "skipped": skipped}, indent=1))
    for reason in skipped:
        tqdm.write(f"[sweep] skipped {reason}")
    for spec, run in Progress(runs, desc="sweep", unit="run"):
        if final_loss(run.out_dir, spec.steps) is not None:
            continue
        shutil.rmtree(run.out_dir, ignore_errors=True)  # an interrupted run starts over
        run.out_dir.mkdir(parents=True)
        (run.out_dir / "data").symlink_to(shared.resolve(), target_is_directory=True)
        (run.out_dir / RUN_FILE).write_text(json.dumps(asdict(spec), indent=1))
        tqdm.write(f"[sweep] {spec.name}: N = {count(spec.params)}, D = {count(spec.tokens)}, {spec.steps} steps")
        pretrain(run)
    return out


def final_loss(run_dir: Path, steps: int) -> float | None:
    """The validation loss logged at the run's last step, or None while it has not got there."""
    final = [r["val_loss"] for r in RunDir(run_dir).records() if r.get("step") == steps and "val_loss" in r]
    return final[-1] if final else None


def load_runs(runs_dir: str | Path) -> tuple[list[Run], list[str]]:
    """The finished runs under `runs_dir`, and the names of those not finished."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: no such directory")
    found = sorted(runs_dir.glob(f"*/{RUN_FILE}"))
    if not found:
        raise ValueError(f"no runs in {runs_dir}: expected run directories with {RUN_FILE}, "
                         "as `lmforge scaling sweep` writes them")
    runs, unfinished = [], []
    for path in found:
        try:
            spec = RunSpec(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}: not a run description written by `lmforge scaling sweep` ({e})") from None
        loss = final_loss(path.parent, spec.steps)
        if loss is None:
            unfinished.append(spec.name)
        else:
            runs.append(Run(spec.name, spec.params, spec.tokens, spec.flops, loss))
    return runs, unfinished


def fit(runs_dir: str | Path) -> ScalingFit:
    """Fit L(N, D) to the finished runs of a sweep; writes scaling.png and report.md into `runs_dir`."""
    runs_dir = Path(runs_dir)
    runs, unfinished = load_runs(runs_dir)
    if len(runs) < 5:
        raise ValueError(f"{runs_dir}: {len(runs)} finished runs ({len(unfinished)} unfinished); fitting "
                         "L(N, D) = E + A/N^alpha + B/D^beta needs at least 5")
    result = fit_law([r.params for r in runs], [r.tokens for r in runs], [r.loss for r in runs])
    plot = plot_fit(result.law, runs, runs_dir / PLOT_FILE)
    report = runs_dir / REPORT_FILE
    report.write_text(render_report(result.law, result.objective, runs, unfinished))
    return ScalingFit(result.law, result.objective, runs, unfinished, plot, report)


# ---- plot and report ---------------------------------------------------------------------------


def by_budget(runs: list[Run]) -> dict[float, list[Run]]:
    budgets: dict[float, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.flops, r.params)):
        budgets.setdefault(run.flops, []).append(run)
    return budgets


def plot_fit(law: ScalingLaw, runs: list[Run], out: Path) -> Path:
    """IsoFLOP curves (loss against N at each budget, measured and fitted) and the frontier N_opt(C)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    budgets = by_budget(runs)
    fig, (iso, frontier) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    n_all = np.array([r.params for r in runs], dtype=float)
    n_grid = np.geomspace(n_all.min() / 2, n_all.max() * 2, 200)
    losses = [r.loss for r in runs]
    for color, (flops, group) in zip(colors, budgets.items()):
        iso.scatter([r.params for r in group], [r.loss for r in group], color=color, zorder=3)
        iso.plot(n_grid, law.loss(n_grid, flops / (6 * n_grid)), color=color, label=f"C = {flops:.2g}")
        n_opt = law.optimal_params(flops)
        losses.append(law.loss(n_opt, flops / (6 * n_opt)))
        iso.plot(n_opt, losses[-1], "*", color=color, markersize=12, zorder=4)
    margin = 0.1 * (max(losses) - min(losses)) + 1e-3
    iso.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss",
            ylim=(min(losses) - margin, max(losses) + margin),
            title="IsoFLOP curves (points: runs; lines: fit; stars: optimum)")
    iso.legend(fontsize=8)
    c = np.array(list(budgets))
    c_grid = np.geomspace(c.min() / 3, c.max() * 3, 100)
    frontier.plot(c_grid, law.optimal_params(c_grid), color="k",
                  label=f"fit: N_opt = {law.G:.3g} (C/6)^{law.params_exponent:.2f}")
    best = [min(group, key=lambda r: r.loss) for group in budgets.values()]
    frontier.scatter([r.flops for r in best], [r.params for r in best], color=colors, zorder=3,
                     label="lowest-loss run per budget")
    frontier.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="N_opt",
                 title="Compute-optimal frontier")
    frontier.legend(fontsize=8)
    for ax in (iso, frontier):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def render_report(law: ScalingLaw, objective: float, runs: list[Run], unfinished: list[str]) -> str:
    budgets = by_budget(runs)
    lines = [
        "# Scaling-law fit\n",
        f"{len(runs)} finished runs" + (f" ({len(unfinished)} unfinished, left out: {', '.join(unfinished)})"
                                        if unfinished else "")
        + ". Fitted L(N, D) = E + A/N^α + B/D^β by minimising the Huber loss (δ = 1e-3) of log-loss residuals "
        "with L-BFGS from a grid of initialisations (Hoffmann et al. 2022, approach 3). N counts non-embedding "
        f"parameters, D training tokens; C = 6ND. Huber objective at the optimum: {objective:.3g}.\n",
        "| | E | A | B | α | β | a = β/(α+β) | b = α/(α+β) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, l in (("this sweep", law), ("Chinchilla (Hoffmann et al. 2022)", CHINCHILLA)):
        lines.append(f"| {label} | {l.E:.4g} | {l.A:.4g} | {l.B:.4g} | {l.alpha:.3f} | {l.beta:.3f} | "
                     f"{l.params_exponent:.3f} | {l.tokens_exponent:.3f} |")
    lines += [
        "",
        f"Compute-optimal frontier: N_opt(C) = {law.G:.4g} · (C/6)^{law.params_exponent:.3f}, "
        f"D_opt(C) = (C/6)^{law.tokens_exponent:.3f} / {law.G:.4g}.\n",
        f"![IsoFLOP curves and the compute-optimal frontier]({PLOT_FILE})\n",
        "| budget C | N_opt | D_opt | D/N | predicted loss | lowest-loss run | its loss |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for flops, group in budgets.items():
        n, d = float(law.optimal_params(flops)), float(law.optimal_tokens(flops))
        best = min(group, key=lambda r: r.loss)
        lines.append(f"| {flops:.3g} | {count(n)} | {count(d)} | {d / n:.1f} | {law.loss(n, d):.3f} | "
                     f"{best.name} | {best.loss:.3f} |")
    lines += ["", "## Runs\n", "| run | N | D | C | validation loss | fitted |", "|---|---:|---:|---:|---:|---:|"]
    for run in sorted(runs, key=lambda r: (r.params, r.flops)):
        lines.append(f"| {run.name} | {count(run.params)} | {count(run.tokens)} | {run.flops:.3g} | "
                     f"{run.loss:.4f} | {law.loss(run.params, run.tokens):.4f} |")
    return "\n".join(lines) + "\n"
