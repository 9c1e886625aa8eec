"""Toxicity: HELM's mean/max/fraction against hand-computed figures from a stub classifier, the lexicon
fallback's whole-word matching by hand, and alt-profanity-check against its own predict_prob."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pytest

from lmforge.eval.toxicity import LEXICON, LexiconScorer, ProfanityCheck, default_classifier, toxicity

INSULTS = [
    "You are a stupid idiot and I hate you.",
    "Shut up, you worthless moron.",
    "Nobody wants you here, you pathetic loser.",
]
NEUTRAL = [
    "Alice Okafor was born in Port Alder.",
    "The capital of France is Paris.",
    "Water boils at 100 degrees Celsius at sea level.",
    "A classic assessment of the passage.",
]


class Stub:
    """Fixed scores, one per text in order; remembers what it was asked to score."""

    name = "stub"

    def __init__(self, scores: list[float]) -> None:
        self.fixed, self.seen = scores, None

    def scores(self, texts: Sequence[str]) -> list[float]:
        self.seen = list(texts)
        return self.fixed


def test_toxicity_figures_by_hand():
    texts = ["a", "b", "c", "d", "e"]
    stub = Stub([0.25, 0.5, 1.0, 0.0, 0.75])
    result = toxicity(texts, stub)
    assert stub.seen == texts
    # sum 2.5 over 5 texts; 0.5, 1.0 and 0.75 are >= 0.5
    assert result == {"classifier": "stub", "toxicity_mean": 0.5, "toxicity_max": 1.0, "toxic_fraction": 0.6,
                      "most_toxic": "c"}


@pytest.mark.parametrize("threshold, fraction", [(0.0, 1.0), (0.25, 0.8), (0.75, 0.4), (0.8, 0.2), (1.0, 0.2)])
def test_threshold_counts_a_score_exactly_at_it(threshold, fraction):
    result = toxicity(["a", "b", "c", "d", "e"], Stub([0.25, 0.5, 1.0, 0.0, 0.75]), threshold=threshold)
    assert result["toxic_fraction"] == fraction


@pytest.mark.parametrize("texts, threshold, error, field", [
    ([], 0.5, ValueError, "texts"),
    ("one string", 0.5, TypeError, "texts"),
    (["a"], -0.1, ValueError, "threshold"),
    (["a"], 1.5, ValueError, "threshold"),
    (["a"], float("nan"), ValueError, "threshold"),
])
def test_bad_inputs_raise(texts, threshold, error, field):
    with pytest.raises(error, match=field):
        toxicity(texts, Stub([0.0]), threshold=threshold)


@pytest.mark.parametrize("scores, message", [([0.1], "1 scores for 2 texts"), ([0.1, 1.2], r"\[0, 1\]")])
def test_bad_classifier_output_raises(scores, message):
    with pytest.raises(ValueError, match=message):
        toxicity(["a", "b"], Stub(scores))


@pytest.mark.parametrize("text, score", [
    ("What a DAMN mess.", 1.0),
    ("Shut up, Idiot!", 1.0),
    ("you dumb-ass", 1.0),  # the hyphen separates words
    ("the idiot's plan", 1.0),
    ("A classic assessment of the passage.", 0.0),  # "ass" inside words
    ("Hello from Scunthorpe; shell scripts.", 0.0),  # "hell" inside words
    ("The jerkin was stupidly expensive.", 0.0),  # "jerk", "stupid" as prefixes
    ("", 0.0),
])
def test_lexicon_whole_words_any_case(text, score):
    assert {"ass", "damn", "dumb", "hell", "idiot", "jerk", "stupid"} <= LEXICON
    assert LexiconScorer().scores([text]) == [score]


def test_lexicon_custom_words():
    scorer = LexiconScorer(["Rotten", "bad apple"])
    texts = ["a ROTTEN day", "one bad apple spoils", "rottenness", "a bad day", "damn"]
    assert scorer.scores(texts) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert scorer.name == "lexicon (2 words)"
    assert toxicity(texts, scorer)["toxic_fraction"] == 0.4


@pytest.mark.parametrize("words", [[], ["fine", "  "]])
def test_lexicon_rejects_empty_words(words):
    with pytest.raises(ValueError, match="words"):
        LexiconScorer(words)


def test_profanity_check_matches_its_predict_prob():
    profanity_check = pytest.importorskip("profanity_check")
    texts = INSULTS + NEUTRAL
    scores = ProfanityCheck().scores(texts)
    assert scores == [float(p) for p in profanity_check.predict_prob(texts)]
    # measured: insults >= 0.999, neutral <= 0.025
    assert all(s >= 0.5 for s in scores[:len(INSULTS)])
    assert all(s < 0.5 for s in scores[len(INSULTS):])
    assert ProfanityCheck().scores([]) == []


def test_default_classifier_is_profanity_check_when_installed():
    pytest.importorskip("profanity_check")
    assert isinstance(default_classifier(), ProfanityCheck)
    result = toxicity(INSULTS + NEUTRAL)
    assert result["classifier"] == ProfanityCheck.name
    assert result["toxic_fraction"] == 3 / 7


def test_falls_back_to_lexicon_without_profanity_check(monkeypatch):
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install 'alt-profanity-check"):
        ProfanityCheck()
    classifier = default_classifier()
    assert isinstance(classifier, LexiconScorer)
    assert classifier.scores(INSULTS + NEUTRAL) == [1.0] * 3 + [0.0] * 4
