"""Calibration and selective-answering metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from lmforge.eval import calibration as cal


def test_ece_equal_mass_bins_by_hand():
    # Sorted confidences 0.1..1.0, two bins of five: [0.1..0.5] mean 0.3, [0.6..1.0] mean 0.8.
    confidence = [0.9, 0.1, 0.6, 0.3, 1.0, 0.2, 0.8, 0.5, 0.7, 0.4]
    correct = [1, 0, 1, 1, 1, 0, 0, 0, 1, 0]
    # Low bin (0.1, 0.2, 0.3, 0.4, 0.5): right 0, 0, 1, 0, 0 -> accuracy 0.2, gap |0.2 - 0.3| = 0.1.
    # High bin (0.6, 0.7, 0.8, 0.9, 1.0): right 1, 1, 0, 1, 1 -> accuracy 0.8, gap 0.
    assert cal.expected_calibration_error(confidence, correct, bins=2) == pytest.approx(0.5 * 0.1 + 0.5 * 0.0)
    bins = cal.reliability_bins(confidence, correct, bins=2)
    assert [(b.count, round(b.confidence, 10), b.accuracy) for b in bins] == [(5, 0.3, 0.2), (5, 0.8, 0.8)]


def test_ece_unequal_split_and_one_item_per_bin():
    # 7 items in 3 bins: sizes 3, 2, 2 (the first n % bins bins one larger).
    confidence, correct = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9, 0.95], [0, 0, 1, 1, 0, 1, 1]
    bins = cal.reliability_bins(confidence, correct, bins=3)
    assert [b.count for b in bins] == [3, 2, 2]
    expected = 3 / 7 * abs(1 / 3 - 0.2) + 2 / 7 * abs(0.5 - 0.65) + 2 / 7 * abs(1.0 - 0.925)
    assert cal.expected_calibration_error(confidence, correct, bins=3) == pytest.approx(expected)
    # One item per bin: the mean absolute gap.
    assert cal.expected_calibration_error([0.25, 0.75], [0, 1], bins=10) == pytest.approx(0.25)


def test_perfectly_calibrated_and_confidently_wrong():
    assert cal.expected_calibration_error([1.0] * 4, [1] * 4) == 0.0
    assert cal.expected_calibration_error([0.9] * 10, [0] * 10) == pytest.approx(0.9)


def test_brier_by_hand():
    assert cal.brier_score([0.5, 0.5], [1, 0]) == pytest.approx(0.25)
    assert cal.brier_score([0.9, 0.2, 0.6], [1, 0, 0]) == pytest.approx((0.01 + 0.04 + 0.36) / 3)
    # Multi-class: (0.7-1)^2 + 0.2^2 + 0.1^2 = 0.14; (0.5)^2 + (0.5-1)^2 + 0 = 0.5.
    assert cal.multiclass_brier([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]], [0, 1]) == pytest.approx((0.14 + 0.5) / 2)


def test_choice_probabilities_is_a_softmax():
    probabilities = cal.choice_probabilities([math.log(1), math.log(3), math.log(4)])
    assert probabilities == pytest.approx([0.125, 0.375, 0.5])
    assert cal.choice_probabilities([-1000.0, -1000.0]) == pytest.approx([0.5, 0.5])  # no underflow


def test_coverage_curve_and_area_by_hand():
    confidence, correct = [0.9, 0.8, 0.8, 0.3], [1, 0, 1, 0]
    # Most confident first: 0.9 right (1/1); the tie at 0.8 enters together (2/3); then 2/4.
    assert cal.coverage_curve(confidence, correct) == [(0.25, 1.0), (0.75, pytest.approx(2 / 3)), (1.0, 0.5)]
    assert cal.selective_area(confidence, correct) == pytest.approx(0.25 * 1.0 + 0.5 * 2 / 3 + 0.25 * 0.5)
    assert cal.accuracy_at_coverage(confidence, correct, 0.25) == 1.0
    assert cal.accuracy_at_coverage(confidence, correct, 1.0) == 0.5
    # A confidence that says nothing (all equal): the area is the accuracy.
    assert cal.selective_area([0.5] * 4, [1, 0, 0, 1]) == pytest.approx(0.5)


def test_confident_wrong_rate_leaves_out_abstentions():
    confidence, correct = [0.9, 0.6, 0.4, 0.95, 0.7], [0, 0, 0, 1, 0]
    assert cal.confident_wrong_rate(confidence, correct, 0.5) == pytest.approx(3 / 5)
    abstained = [False, True, False, False, False]
    assert cal.confident_wrong_rate(confidence, correct, 0.5, abstained) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="abstention flags"):
        cal.confident_wrong_rate(confidence, correct, 0.5, abstained[:2])
    assert cal.confident_wrong_rate(confidence, correct, 0.65) == pytest.approx(2 / 5)


@pytest.mark.parametrize("text, expected", [
    ("I don't know who Alice Okafor is.", True), ("i do not know.", True), ("I'm not sure about that.", True),
    ("Alice Okafor was born in Port Alder.", False), ("Nobody knows.", False),
])
def test_abstains(text, expected):
    assert cal.abstains(text) is expected


@pytest.mark.parametrize("confidence, correct", [([], []), ([0.5], [1, 0]), ([1.5], [1]), ([float("nan")], [1])])
def test_bad_inputs(confidence, correct):
    with pytest.raises(ValueError):
        cal.expected_calibration_error(confidence, correct)
