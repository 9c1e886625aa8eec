"""Calibration and selective answering: does the model's confidence say how often it is right?

- Expected calibration error over equal-mass bins (HELM's ECE: items sorted by confidence, cut into
  bins of equal size; the gap between each bin's accuracy and its mean confidence, weighted by size).
- Brier score: the mean squared error of the confidence against correctness (1 or 0); for multiple
  choice, the multi-class form over the choice probabilities (Brier's original, in [0, 2]).
- Selective answering: answer only the most confident share of the questions (coverage) and measure
  the accuracy of those (the accuracy-coverage curve and its area, HELM's selective classification);
  a confident wrong answer, one held with at least `threshold` confidence, is a hallucination."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

BINS = 10
_ABSTENTION = re.compile(r"\bI (?:don't|do not) know\b|\bI(?:'m| am) not sure\b", re.IGNORECASE)


@dataclass(frozen=True)
class Bin:
    """Items of similar confidence: how many, their mean confidence and their accuracy."""

    count: int
    confidence: float
    accuracy: float


def _check(confidence: Sequence[float], correct: Sequence[bool | float]) -> None:
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences for {len(correct)} outcomes")
    if not confidence:
        raise ValueError("no items to score")
    bad = [c for c in confidence if not 0.0 <= c <= 1.0 or math.isnan(c)]
    if bad:
        raise ValueError(f"confidences must lie in [0, 1], got {bad[0]}")


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool | float], bins: int = BINS) -> list[Bin]:
    """The items sorted by confidence and cut into `bins` bins of equal size (the first `n % bins`
    bins one larger, as numpy's array_split cuts); fewer bins when there are fewer items."""
    _check(confidence, correct)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    order = sorted(range(len(confidence)), key=lambda i: confidence[i])
    n, bins = len(order), min(bins, len(order))
    out, start = [], 0
    for b in range(bins):
        size = n // bins + (b < n % bins)
        members = order[start : start + size]
        start += size
        right = sum(float(correct[i]) for i in members)
        out.append(Bin(size, sum(confidence[i] for i in members) / size, right / size))
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool | float], bins: int = BINS) -> float:
    """Σ over equal-mass bins of (bin size / n) x |bin accuracy - bin mean confidence|."""
    cut = reliability_bins(confidence, correct, bins)
    n = sum(b.count for b in cut)
    return sum(b.count / n * abs(b.accuracy - b.confidence) for b in cut)


def brier_score(confidence: Sequence[float], correct: Sequence[bool | float]) -> float:
    """Mean of (confidence - correct)^2: 0 for a perfect forecaster, 0.25 for one always at 0.5."""
    _check(confidence, correct)
    return sum((c - float(y)) ** 2 for c, y in zip(confidence, correct)) / len(confidence)


def multiclass_brier(probabilities: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Mean over items of Σ_k (p_k - [k is the answer])^2, over the choice probabilities."""
    if len(probabilities) != len(answers) or not answers:
        raise ValueError(f"{len(probabilities)} probability rows for {len(answers)} answers")
    total = 0.0
    for row, answer in zip(probabilities, answers):
        if not 0 <= answer < len(row):
            raise ValueError(f"answer index {answer} is out of range for {len(row)} choices")
        total += sum((p - (k == answer)) ** 2 for k, p in enumerate(row))
    return total / len(answers)


def choice_probabilities(loglikelihoods: Sequence[float]) -> list[float]:
    """The choices' probabilities: their log-likelihoods normalised over the choices (a softmax)."""
    top = max(loglikelihoods)
    weights = [math.exp(ll - top) for ll in loglikelihoods]
    return [w / sum(weights) for w in weights]


def coverage_curve(confidence: Sequence[float], correct: Sequence[bool | float]) -> list[tuple[float, float]]:
    """(coverage, accuracy) when answering only the k most confident items, for k = 1..n (ties in
    confidence enter together, so a point is only where the threshold can fall)."""
    _check(confidence, correct)
    order = sorted(range(len(confidence)), key=lambda i: -confidence[i])
    points, right = [], 0.0
    for k, i in enumerate(order, 1):
        right += float(correct[i])
        if k == len(order) or confidence[order[k]] != confidence[i]:
            points.append((k / len(order), right / k))
    return points


def selective_area(confidence: Sequence[float], correct: Sequence[bool | float]) -> float:
    """The area under the accuracy-coverage curve (each item's share of coverage times the accuracy
    when answering down to it): 1 for perfect, the accuracy itself for a confidence that says nothing."""
    points, area, last = coverage_curve(confidence, correct), 0.0, 0.0
    for coverage, accuracy in points:
        area += (coverage - last) * accuracy
        last = coverage
    return area


def accuracy_at_coverage(confidence: Sequence[float], correct: Sequence[bool | float], coverage: float) -> float:
    """Accuracy on the most confident `coverage` share of the items (rounded up, at least one item; among
    equally confident items, the first in order)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    _check(confidence, correct)
    order = sorted(range(len(confidence)), key=lambda i: -confidence[i])
    kept = order[: max(1, math.ceil(coverage * len(order) - 1e-9))]
    return sum(float(correct[i]) for i in kept) / len(kept)


def confident_wrong_rate(confidence: Sequence[float], correct: Sequence[bool | float], threshold: float = 0.5,
                         abstained: Sequence[bool] | None = None) -> float:
    """The share of items answered wrongly with confidence >= `threshold` (hallucinations); an item the
    model abstained on ("I don't know") is not an answer."""
    _check(confidence, correct)
    abstained = [False] * len(correct) if abstained is None else abstained
    if len(abstained) != len(correct):
        raise ValueError(f"{len(abstained)} abstention flags for {len(correct)} items")
    return sum(c >= threshold and not y and not a for c, y, a in zip(confidence, correct, abstained)) / len(correct)


def abstains(text: str) -> bool:
    """Whether a reply declines to answer: "I don't know", "I do not know", "I'm not sure"."""
    return bool(_ABSTENTION.search(text))
