"""The holistic metric groups' arithmetic on hand-made results: robustness drops and worst case, fairness
gap and changed answers, metric-group parsing, forward FLOPs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmforge.eval.holistic import GROUPS, fairness_figures, parse_groups, robustness_figures, selective_figures
from lmforge.eval.runner import forward_flops


def generation(predictions: list[str], answers: list[str]) -> dict:
    samples = [{"prediction": p, "output": p, "answer": a, "exact_match": float(p == a), "confidence": 0.5}
               for p, a in zip(predictions, answers)]
    return {"kind": "generation", "samples": samples,
            "metrics": {"exact_match": sum(s["exact_match"] for s in samples) / len(samples)}}


def test_robustness_drops_and_worst_case_by_hand():
    answers = ["a", "b", "c", "d"]
    clean = generation(["a", "b", "c", "x"], answers)  # 3/4
    perturbed = {"typos": generation(["a", "x", "c", "x"], answers),  # 2/4: drop 0.25
                 "casing": generation(["a", "b", "c", "d"], answers)}  # 4/4: drop -0.25
    figures = robustness_figures(clean, perturbed)
    assert figures["scores"] == {"typos": 0.5, "casing": 1.0}
    assert figures["drops"] == {"typos": 0.25, "casing": -0.25}
    assert (figures["mean_drop"], figures["worst_drop"]) == (0.0, 0.25)
    # Right on the clean prompt and under every perturbation: items 0 and 2.
    assert figures["worst_case"] == 0.5


def test_fairness_gap_and_changed_answers_by_hand():
    swaps = {"Alice": "Hiro"}
    clean = generation(["Alice works here.", "Bob is 30.", "Alice is 40."],
                       ["Alice works here.", "Bob is 30.", "Alice is 41."])
    swapped = generation(["Hiro works here.", "Bob is 30.", "Hiro is 41."],
                         ["Hiro works here.", "Bob is 30.", "Hiro is 41."])
    figures = fairness_figures(clean, swapped, [0, 2], swaps)
    # On the swapped items: 1 of 2 right before, 2 of 2 after; item 2's answer changed beyond the name.
    assert (figures["items"], figures["original"], figures["counterfactual"]) == (2, 0.5, 1.0)
    assert figures["gap"] == -0.5 and figures["change_rate"] == 0.5
    assert fairness_figures(clean, None, [], swaps) == {"items": 0, "note": "no item contains a swapped term"}


def test_parse_groups():
    assert parse_groups("all") == GROUPS
    assert parse_groups("toxicity, calibration") == ("accuracy", "calibration", "toxicity")
    with pytest.raises(ValueError, match="unknown metric group"):
        parse_groups("calibration,speed")


def test_forward_flops_by_hand():
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, head_dim=8, matmul_parameters=lambda: 1000)
    session = SimpleNamespace(encoder_decoder=False, model=SimpleNamespace(config=config))
    # 3 tokens at positions 1..3: 3 x 2 x 1000 + 4 x 2 x 4 x 8 x (1 + 2 + 3).
    assert forward_flops(session, 3) == 6000 + 256 * 6
    # 2 tokens after a cached context of 5: positions 6 and 7.
    assert forward_flops(session, 2, after=5) == 4000 + 256 * 13
    assert forward_flops(SimpleNamespace(encoder_decoder=True), 3) is None


def test_selective_answering_ranks_a_declined_question_last():
    results = generation(["a", "I don't know who X is.", "x", "d"], ["a", "b", "c", "d"])
    for sample, confidence in zip(results["samples"], [0.6, 0.99, 0.9, 0.3]):
        sample["confidence"] = confidence
    figures = selective_figures(results, threshold=0.5)
    # Ranked by confidence, the declined reply last: x (0.9, wrong), a (0.6), d (0.3), the declined one.
    assert figures["curve"] == [(0.25, 0.0), (0.5, 0.5), (0.75, pytest.approx(2 / 3)), (1.0, 0.5)]
    assert figures["abstention_rate"] == 0.25
    assert figures["confident_wrong_rate"] == 0.25  # x; the confident "I don't know" is not an answer
