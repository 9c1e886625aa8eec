"""Metrics against independent oracles: hand-computed SQuAD cases, ROUGE and corpus BLEU recomputed
from n-gram counts on random strings, and lm-eval's acc/acc_norm rule."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import sacrebleu

from lmforge.eval import metrics

WORDS = "alder brook cedar dune ember fjord grove heath inlet juniper knoll".split()


@pytest.mark.parametrize("text, normalized", [
    ("The  Cat, sat!", "cat sat"),
    ("an apple a day", "apple day"),
    ("Theatre of the absurd.", "theatre of absurd"),
    ("  ", ""),
])
def test_normalize_answer(text, normalized):
    assert metrics.normalize_answer(text) == normalized


@pytest.mark.parametrize("prediction, reference, strict, normalized, f1", [
    ("Port Alder", "Port Alder", 1, 1, 1.0),
    (" Port Alder\n", "Port Alder", 1, 1, 1.0),
    ("the port alder.", "Port Alder", 0, 1, 1.0),
    ("Port", "Port Alder", 0, 0, 2 / 3),  # precision 1, recall 1/2
    ("Alder Port Alder", "port alder", 0, 0, 0.8),  # common 2: precision 2/3, recall 1
    ("Eastbrook", "Port Alder", 0, 0, 0.0),
    ("the", "a", 0, 1, 1.0),  # both normalise to nothing
    ("the", "Port", 0, 0, 0.0),
])
def test_exact_match_and_f1_by_hand(prediction, reference, strict, normalized, f1):
    assert metrics.exact_match(prediction, reference) == strict
    assert metrics.exact_match(prediction, reference, normalize=True) == normalized
    assert metrics.token_f1(prediction, reference) == pytest.approx(f1)


def random_pairs(seed: int, n: int = 12) -> tuple[list[str], list[str]]:
    """References of random words, and predictions that keep most of each and change the rest."""
    rng = random.Random(seed)
    references, predictions = [], []
    for _ in range(n):
        ref = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        pred = [w if rng.random() < 0.7 else rng.choice(WORDS) for w in ref]
        pred = pred[rng.randint(0, 2):] + [rng.choice(WORDS) for _ in range(rng.randint(0, 3))]
        references.append(" ".join(ref))
        predictions.append(" ".join(pred))
    return predictions, references


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def f_measure(overlap: int, predicted: int, reference: int) -> float:
    p, r = overlap / max(predicted, 1), overlap / max(reference, 1)
    return 2 * p * r / (p + r) if p + r else 0.0


def lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rouge_equals_counts_by_hand(seed):
    predictions, references = random_pairs(seed)
    expected = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        p, r = pred.split(), ref.split()
        for n in (1, 2):
            overlap = sum((ngrams(p, n) & ngrams(r, n)).values())
            expected[f"rouge{n}"] += f_measure(overlap, sum(ngrams(p, n).values()), sum(ngrams(r, n).values()))
        expected["rougeL"] += f_measure(lcs(p, r), len(p), len(r))
    got = metrics.rouge(predictions, references)
    assert got == pytest.approx({k: v / len(predictions) for k, v in expected.items()}, abs=1e-12)
    assert 0 < got["rouge2"] < got["rouge1"] < 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_is_corpus_bleu_from_summed_counts(seed):
    predictions, references = random_pairs(seed)
    matches, totals = [0] * 4, [0] * 4
    for pred, ref in zip(predictions, references):
        p, r = pred.split(), ref.split()
        for n in range(1, 5):
            matches[n - 1] += sum((ngrams(p, n) & ngrams(r, n)).values())
            totals[n - 1] += max(len(p) - n + 1, 0)
    hyp_len, ref_len = sum(len(p.split()) for p in predictions), sum(len(r.split()) for r in references)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    expected = 100 * brevity * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / 4)
    got = metrics.bleu(predictions, references)
    assert got == pytest.approx(expected, rel=1e-9)
    # Corpus BLEU, not the mean of sentence BLEUs.
    sentence_bleus = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)]
    assert abs(got - sum(sentence_bleus) / len(sentence_bleus)) > 0.1


def test_metric_inputs_must_pair_up():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.rouge([], [])


def test_perplexity_and_bits_per_byte():
    assert metrics.perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    # 8 bytes at a uniform 1/256 each: 8 bits per byte.
    assert metrics.bits_per_byte(8 * math.log(256), 8) == pytest.approx(8.0)


def test_choose_follows_lm_eval_acc_and_acc_norm():
    # Raw log-likelihood favours the short choice; per character the long one.
    best, best_norm = metrics.choose([-2.0, -3.0], ["ab", "abcdefgh"])
    assert (best, best_norm) == (0, 1)
    assert metrics.choose([-1.0, -1.0, -0.5], ["x", "y", "zz"]) == (2, 2)
    assert metrics.choose([-1.0, -1.0], ["x", "y"]) == (0, 0)  # ties: the first, as numpy's argmax
    with pytest.raises(ValueError, match="3 log-likelihoods for 2 choices"):
        metrics.choose([0.0, 0.0, 0.0], ["a", "b"])
