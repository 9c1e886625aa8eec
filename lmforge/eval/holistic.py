"""Holistic evaluation (HELM's metric groups) of a model on one task: accuracy, calibration, selective
answering, robustness, fairness, toxicity and efficiency. `lmforge eval --metrics all` is `holistic_eval`
then `write_holistic_report`.

An item is right when its greedy answer matches exactly (generation) or its most likely choice is the
answer (multiple choice). Confidence is the answer's probability under the model: the generated answer's
sequence probability (exp of its summed token log-probabilities), or the chosen choice's probability
among the choices. Robustness re-runs the task under each perturbation of its prompts
(`lmforge.eval.perturb`); fairness re-runs it with names or pronouns swapped in prompts and references
(the task's own swaps, else pronouns), on the items the swaps change."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lmforge.eval import calibration as cal
from lmforge.eval.perturb import PERTURBATIONS, PRONOUN_SWAPS, counterfactual_task, perturb_task, swap_terms, \
    swapped_items
from lmforge.eval.runner import evaluate
from lmforge.eval.tasks import Task
from lmforge.generate.session import Session

GROUPS = ("accuracy", "calibration", "selective", "robustness", "fairness", "toxicity", "efficiency")
CONFIDENT = 0.5  # a wrong answer held with at least this confidence is a hallucination
COVERAGES = (0.25, 0.5, 0.75, 1.0)


def parse_groups(spec: str) -> tuple[str, ...]:
    """"all", or comma-separated group names, in GROUPS order; accuracy is always in."""
    names = GROUPS if spec.strip() == "all" else tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown metric group(s): {', '.join(unknown)} (groups: all, {', '.join(GROUPS)})")
    return tuple(g for g in GROUPS if g in names or g == "accuracy")


def outcomes(results: dict[str, Any]) -> tuple[list[float], list[bool]]:
    """Each item's confidence and whether it is right."""
    samples = results["samples"]
    if results["kind"] == "choice":
        return [s["confidence"] for s in samples], [s["prediction"] == s["answer_index"] for s in samples]
    return [s["confidence"] for s in samples], [bool(s["exact_match"]) for s in samples]


def primary(results: dict[str, Any]) -> str:
    """The metric an item's rightness is: exact match (generation) or accuracy (multiple choice)."""
    return "acc" if results["kind"] == "choice" else "exact_match"


def calibration_figures(results: dict[str, Any], bins: int = cal.BINS) -> dict[str, Any]:
    confidence, correct = outcomes(results)
    figures = {"ece": cal.expected_calibration_error(confidence, correct, bins),
               "brier": cal.brier_score(confidence, correct), "mean_confidence": sum(confidence) / len(confidence),
               "bins": [vars(b) for b in cal.reliability_bins(confidence, correct, bins)]}
    if results["kind"] == "choice":
        samples = results["samples"]
        figures["multiclass_brier"] = cal.multiclass_brier([s["probabilities"] for s in samples],
                                                           [s["answer_index"] for s in samples])
    return figures


def abstentions(results: dict[str, Any]) -> list[bool]:
    """Whether each item's reply declines to answer ("I don't know"); never for multiple choice."""
    if results["kind"] != "generation":
        return [False] * len(results["samples"])
    return [cal.abstains(s["output"]) for s in results["samples"]]


def answering_confidence(confidence: Sequence[float], abstained: Sequence[bool]) -> list[float]:
    """The confidence selective answering ranks by: a reply that declines ranks below every answer."""
    return [0.0 if a else c for c, a in zip(confidence, abstained)]


def selective_figures(results: dict[str, Any], threshold: float = CONFIDENT) -> dict[str, Any]:
    """The accuracy-coverage curve, its area and points (a declined question ranks last), the share of
    confident wrong answers and of replies that decline."""
    confidence, correct = outcomes(results)
    abstained = abstentions(results)
    ranked = answering_confidence(confidence, abstained)
    return {"area": cal.selective_area(ranked, correct),
            "accuracy_at_coverage": {f"{c:g}": cal.accuracy_at_coverage(ranked, correct, c) for c in COVERAGES},
            "curve": cal.coverage_curve(ranked, correct),
            "abstention_rate": sum(abstained) / len(abstained),
            "confident_wrong_rate": cal.confident_wrong_rate(confidence, correct, threshold, abstained),
            "threshold": threshold}


def robustness_figures(clean: dict[str, Any], perturbed: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Each perturbation's score and drop from the clean score, their mean and worst drop, and HELM's
    worst case: the share of items right on the clean prompt and under every perturbation."""
    metric = primary(clean)
    base = clean["metrics"][metric]
    scores = {kind: r["metrics"][metric] for kind, r in perturbed.items()}
    drops = {kind: base - score for kind, score in scores.items()}
    right = [outcomes(clean)[1], *(outcomes(r)[1] for r in perturbed.values())]
    return {"metric": metric, "clean": base, "scores": scores, "drops": drops,
            "mean_drop": sum(drops.values()) / len(drops), "worst_drop": max(drops.values()),
            "worst_case": sum(all(col) for col in zip(*right)) / len(right[0])}


def fairness_figures(clean: dict[str, Any], swapped: dict[str, Any] | None, changed: Sequence[int],
                     swaps: Mapping[str, str]) -> dict[str, Any]:
    """On the items the swaps change (`swapped`: the results of the counterfactual task): the score on the
    original and the counterfactual prompts, the gap, and the share of items whose answer changed beyond
    the swapped terms themselves."""
    if swapped is None or not changed:
        return {"items": 0, "note": "no item contains a swapped term"}
    right, right_swapped = outcomes(clean)[1], outcomes(swapped)[1]
    before, after = (sum(flags[i] for i in changed) / len(changed) for flags in (right, right_swapped))
    pairs = [(clean["samples"][i], swapped["samples"][i]) for i in changed]
    if clean["kind"] == "choice":
        moved = [a["prediction"] != b["prediction"] for a, b in pairs]
    else:
        moved = [swap_terms(a["prediction"], swaps) != b["prediction"] for a, b in pairs]
    return {"items": len(changed), "metric": primary(clean), "original": before, "counterfactual": after,
            "gap": before - after, "change_rate": sum(moved) / len(moved)}


def holistic_eval(session: Session, task: Task, groups: Sequence[str] = GROUPS, *,
                  swaps: Mapping[str, str] | None = None, perturbation_seed: int = 0,
                  threshold: float = CONFIDENT, classifier: Any = None,
                  prepare: Callable[[Task], Task] | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate `task` (with `options` as `lmforge.eval.runner.evaluate` takes them) and the metric
    `groups` on it; the results carry them under "holistic". Robustness and fairness run the task again
    (once per perturbation, once counterfactual). `prepare` turns the task's items into what the model
    is shown (e.g. retrieved sources put before each question): perturbations apply before it (to the
    question as a user writes it), counterfactual swaps after it (to everything the model reads)."""
    if task.kind == "perplexity":
        raise ValueError(f"{task.name} is a perplexity task: holistic metrics apply to generation and multiple "
                         "choice")
    prepare = prepare or (lambda t: t)
    original, task = task, prepare(task)
    results = evaluate(session, task, **options)
    figures: dict[str, Any] = {"accuracy": results["metrics"]}
    if "calibration" in groups:
        figures["calibration"] = calibration_figures(results)
    if "selective" in groups:
        figures["selective"] = selective_figures(results, threshold)
    if "robustness" in groups:
        perturbed = {kind: evaluate(session, prepare(perturb_task(original, kind, perturbation_seed)), **options)
                     for kind in PERTURBATIONS}
        figures["robustness"] = robustness_figures(results, perturbed)
    if "fairness" in groups:
        swaps = dict(swaps if swaps is not None else task.swaps or PRONOUN_SWAPS)
        changed = [i for i in swapped_items(task, swaps) if i < len(results["samples"])]
        # The whole task again (not only the changed items), so each item gets the same few-shot exemplars.
        swapped = evaluate(session, counterfactual_task(task, swaps), **options) if changed else None
        figures["fairness"] = fairness_figures(results, swapped, changed, swaps)
    if "toxicity" in groups and results["kind"] == "generation":
        from lmforge.eval.toxicity import toxicity

        figures["toxicity"] = toxicity([s["output"] for s in results["samples"]], classifier)
    if "efficiency" in groups:
        figures["efficiency"] = results["efficiency"]
    return {**results, "holistic": figures}
