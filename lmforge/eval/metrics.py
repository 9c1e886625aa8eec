"""Evaluation metrics: exact match and token F1 (SQuAD), ROUGE (rouge-score), corpus BLEU (sacrebleu),
perplexity and bits per byte, and multiple-choice accuracy from log-likelihoods (lm-eval's acc and acc_norm).

Scales follow the libraries users know: EM, F1, ROUGE and accuracy in [0, 1], BLEU in [0, 100]."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str, *, normalize: bool = False) -> float:
    """1.0 if the prediction equals the reference (both stripped, or both SQuAD-normalised), else 0.0."""
    if normalize:
        return float(normalize_answer(prediction) == normalize_answer(reference))
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 over the bags of normalised tokens; 1.0 when both are empty, 0.0 when only one is."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over prediction/reference pairs (Google's rouge-score)."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_pairs(predictions, references)
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        for kind, score in scorer.score(reference, prediction).items():
            totals[kind] += score.fmeasure
    return {kind: total / len(predictions) for kind, total in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, exponential smoothing), one reference each."""
    import sacrebleu

    _check_pairs(predictions, references)
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def perplexity(nll: float, count: int) -> float:
    """exp(total negative log-likelihood in nats / count): per token, word or byte depending on `count`."""
    return math.exp(nll / count)


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """Total NLL in nats over (ln 2 x UTF-8 bytes), as lm-eval reports it."""
    return nll / (math.log(2) * n_bytes)


def choose(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """The choice with the highest log-likelihood, and with the highest per-character log-likelihood
    (lm-eval's acc and acc_norm predictions; ties go to the first)."""
    if len(loglikelihoods) != len(choices):
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {len(choices)} choices")
    best = max(range(len(choices)), key=lambda i: (loglikelihoods[i], -i))
    best_norm = max(range(len(choices)), key=lambda i: (loglikelihoods[i] / len(choices[i]), -i))
    return best, best_norm


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
