"""Holistic results as people read them: a markdown table per metric group, a reliability diagram and an
accuracy-coverage curve (PNG, beside the report), for one model or several side by side."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

RELIABILITY_PNG, COVERAGE_PNG, REPORT_MD = "reliability.png", "coverage.png", "report.md"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(bins: Mapping[str, list[dict[str, float]]], path: Path, title: str = "") -> Path:
    """Accuracy against mean confidence per equal-mass bin, one line per model, and the diagonal a
    calibrated model lies on."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="calibrated")
    for name, cut in bins.items():
        ax.plot([b["confidence"] for b in cut], [b["accuracy"] for b in cut], marker="o", label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (bin mean)", ylabel="accuracy", title=title or "reliability")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_coverage(curves: Mapping[str, list[tuple[float, float]]], path: Path, title: str = "") -> Path:
    """Accuracy when answering only the most confident share of the questions, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, curve in curves.items():
        ax.plot([0.0, *(c for c, _ in curve)], [curve[0][1], *(a for _, a in curve)], drawstyle="steps-pre",
                label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (share answered, most confident first)", ylabel="accuracy",
           title=title or "selective answering")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def group_tables(holistic: Mapping[str, Any]) -> list[str]:
    """One markdown table per metric group present in one model's holistic figures."""
    lines: list[str] = ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_num(v) if isinstance(v, float) else v} |" for k, v in holistic["accuracy"].items()]
    if cal := holistic.get("calibration"):
        lines += ["", "**Calibration** (10 equal-mass bins)\n", "| ECE | Brier | mean confidence |", "|---:|---:|---:|",
                  f"| {_num(cal['ece'])} | {_num(cal['brier'])} | {_num(cal['mean_confidence'])} |"]
        if "multiclass_brier" in cal:
            lines.append(f"\nMulti-class Brier over the choice probabilities: {_num(cal['multiclass_brier'])}.")
    if sel := holistic.get("selective"):
        coverages = list(sel["accuracy_at_coverage"])
        lines += ["", "**Selective answering**\n",
                  "| area under accuracy-coverage | " + " | ".join(f"accuracy at {c} coverage" for c in coverages)
                  + f" | confident wrong (≥ {sel['threshold']:g}) | abstained |",
                  "|---:|" + "---:|" * (len(coverages) + 2),
                  f"| {_num(sel['area'])} | " + " | ".join(_pct(v) for v in sel["accuracy_at_coverage"].values())
                  + f" | {_pct(sel['confident_wrong_rate'])} | {_pct(sel['abstention_rate'])} |"]
    if rob := holistic.get("robustness"):
        lines += ["", f"**Robustness** ({rob['metric']}; clean {_pct(rob['clean'])})\n",
                  "| perturbation | score | drop |", "|---|---:|---:|",
                  *(f"| {k} | {_pct(v)} | {rob['drops'][k]:+.0%} |" for k, v in rob["scores"].items()),
                  f"| mean drop | | {rob['mean_drop']:+.0%} |", f"| worst drop | | {rob['worst_drop']:+.0%} |",
                  f"| right under every perturbation (worst case) | {_pct(rob['worst_case'])} | |"]
    if fair := holistic.get("fairness"):
        lines += ["", "**Fairness** (counterfactual swaps of names or pronouns)\n"]
        lines += [fair["note"]] if not fair["items"] else [
            "| items changed | original | counterfactual | gap | answers changed |", "|---:|---:|---:|---:|---:|",
            f"| {fair['items']} | {_pct(fair['original'])} | {_pct(fair['counterfactual'])} | {fair['gap']:+.0%} | "
            f"{_pct(fair['change_rate'])} |"]
    if tox := holistic.get("toxicity"):
        lines += ["", f"**Toxicity** ({tox['classifier']})\n", "| mean | max | toxic (≥ 0.5) |", "|---:|---:|---:|",
                  f"| {_num(tox['toxicity_mean'])} | {_num(tox['toxicity_max'])} | {_pct(tox['toxic_fraction'])} |",
                  f"\nScored highest: \"{tox['most_toxic']}\"."]
    if eff := holistic.get("efficiency"):
        flops = eff["flops_per_item"]
        latency, peak = eff["latency_s"], eff["process_peak_rss_mb"]
        generated = eff.get("generated_tokens_per_second")
        lines += ["", "**Efficiency**\n", "| seconds | items/s | tokens/s (processed) | tokens/s (generated) | "
                  "latency per request | forward FLOPs per item | weights | peak memory (whole process so far) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {eff['seconds']:.2f} | {eff['items_per_second']:.1f} | {eff['tokens_per_second']:.0f} | "
                  f"{'—' if generated is None else f'{generated:.0f}'} | "
                  f"{'—' if latency is None else f'{latency * 1000:.0f} ms'} | "
                  f"{'—' if flops is None else f'{flops:.3g}'} | {eff['weights_mb']:.1f} MiB | "
                  f"{'—' if peak is None else f'{peak:.0f} MiB'} |"]
    return lines


def summary_lines(holistic: Mapping[str, Any]) -> list[str]:
    """The headline figure of each metric group, for the terminal."""
    lines = []
    if cal := holistic.get("calibration"):
        lines.append(f"  calibration   ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}")
    if sel := holistic.get("selective"):
        lines.append(f"  selective     area {sel['area']:.3f}, confident wrong {sel['confident_wrong_rate']:.0%}, "
                     f"abstained {sel['abstention_rate']:.0%}")
    if rob := holistic.get("robustness"):
        lines.append(f"  robustness    mean drop {rob['mean_drop']:+.1%}, worst drop {rob['worst_drop']:+.1%} "
                     f"({max(rob['drops'], key=rob['drops'].get)}), right under all {rob['worst_case']:.0%}")
    if (fair := holistic.get("fairness")) and fair["items"]:
        lines.append(f"  fairness      {fair['items']} items swapped: gap {fair['gap']:+.1%}, answers changed "
                     f"{fair['change_rate']:.0%}")
    if tox := holistic.get("toxicity"):
        lines.append(f"  toxicity      mean {tox['toxicity_mean']:.3f}, max {tox['toxicity_max']:.3f}")
    if eff := holistic.get("efficiency"):
        latency = "" if eff["latency_s"] is None else f", {eff['latency_s'] * 1000:.0f} ms per request"
        lines.append(f"  efficiency    {eff['tokens_per_second']:.0f} tokens/s processed{latency}")
    return lines


def write_holistic_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """`report.md` in `out_dir`, with the reliability diagram and accuracy-coverage curve beside it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    holistic = results["holistic"]
    modes = ", chat" if results.get("chat") else ""
    lines = [f"# {results['task']} ({results['kind']}, {results['n']} items, {results['shots']}-shot{modes})\n",
             f"Checkpoint: `{results.get('checkpoint', 'session')}`.\n", *group_tables(holistic), ""]
    name = str(results.get("checkpoint", "model"))
    if cal := holistic.get("calibration"):
        plot_reliability({name: cal["bins"]}, out / RELIABILITY_PNG, results["task"])
        lines.append(f"![reliability diagram]({RELIABILITY_PNG})")
    if sel := holistic.get("selective"):
        plot_coverage({name: sel["curve"]}, out / COVERAGE_PNG, results["task"])
        lines.append(f"![accuracy-coverage curve]({COVERAGE_PNG})")
    path = out / REPORT_MD
    path.write_text("\n".join(lines) + "\n")
    return path
