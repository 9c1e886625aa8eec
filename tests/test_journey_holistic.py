"""Holistic evaluation through the command line: `lmforge eval --task qa.jsonl --metrics all` on a micro
llama trained to recite some facts. Oracles: transformers' greedy decoding and log-probabilities (the
answers' confidence, the perturbed and counterfactual answers), calibration and FLOPs worked out here
independently, alt-profanity-check's own scores."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from chat_data import write_jsonl
from recite_model import TEST_TRAINED, TEST_UNSEEN, facts, people, recite_checkpoint, transformers_model

from lmforge.cli import main
from lmforge.eval.perturb import PERTURBATIONS, perturb, swap_terms

MAX_NEW_TOKENS = 32

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, chat_base) -> Path:
    return recite_checkpoint(chat_base, tmp_path_factory.mktemp("journey-holistic") / "model")


@pytest.fixture(scope="module")
def hf(checkpoint):
    return transformers_model(checkpoint)


def greedy(hf, prompt: str) -> tuple[str, float, int, int]:
    """transformers' greedy answer to `prompt` (its first line); the probability of the tokens generated up
    to and including the one that ends it (the one holding the line break, or an end-of-text/turn token);
    the prompt's length and the number of answer tokens before any end token."""
    model, tokenizer = hf
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             eos_token_id=sorted(stops))[0, len(ids):].tolist()
    kept, answer = [], 0
    for token in out:
        kept.append(token)
        if token in stops:
            break
        answer += 1
        if "\n" in tokenizer.decode(kept):
            break
    with torch.no_grad():
        logits = model(torch.tensor([ids + kept])).logits[0].log_softmax(-1)
    logp = sum(logits[len(ids) - 1 + i, t].item() for i, t in enumerate(kept))
    text = tokenizer.decode(kept, skip_special_tokens=True).split("\n")[0].strip()
    return text, math.exp(logp), len(ids), answer


def ece_by_hand(confidence: list[float], correct: list[bool], bins: int = 10) -> float:
    order = sorted(range(len(confidence)), key=lambda i: confidence[i])
    n, total, start = len(order), 0.0, 0
    for b in range(min(bins, n)):
        size = n // min(bins, n) + (b < n % min(bins, n))
        members = order[start:start + size]
        start += size
        gap = sum(correct[i] for i in members) / size - sum(confidence[i] for i in members) / size
        total += size / n * abs(gap)
    return total


@pytest.mark.slow
def test_eval_metrics_all_on_a_generation_task(tmp_path, capsys, checkpoint, hf):
    test = facts(TEST_TRAINED) + facts(TEST_UNSEEN)
    questions, answers = [q for q, _ in test], [a for _, a in test]
    task = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "answer": a} for q, a in test])
    firsts = sorted({people()[i].name.split()[0] for i in [*TEST_TRAINED, *TEST_UNSEEN]})
    swaps = {first: other for first, other in zip(firsts, ["Hiro", "Amara", "Dmitri", "Carmen"])}
    (tmp_path / "swaps.json").write_text(json.dumps(swaps))
    out = tmp_path / "holistic" / "results.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", str(task), "--metrics", "all",
                 "--swaps", str(tmp_path / "swaps.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    holistic = results["holistic"]
    assert list(holistic) == ["accuracy", "calibration", "selective", "robustness", "fairness", "toxicity",
                              "efficiency"]

    # Confidence: the greedy answer's probability, as transformers gives it.
    oracle = [greedy(hf, q) for q in questions]
    samples = results["samples"]
    assert [s["prediction"] for s in samples] == [text for text, *_ in oracle]
    assert [s["confidence"] for s in samples] == pytest.approx([p for _, p, *_ in oracle], rel=1e-4, abs=1e-7)
    confidence = [s["confidence"] for s in samples]
    correct = [text == a for (text, *_), a in zip(oracle, answers)]
    assert 0 < sum(correct) < len(correct)
    assert holistic["calibration"]["ece"] == pytest.approx(ece_by_hand(confidence, correct), abs=1e-6)
    assert holistic["calibration"]["brier"] == pytest.approx(
        sum((c - y) ** 2 for c, y in zip(confidence, correct)) / len(correct), abs=1e-6)
    wrong = sum(c >= 0.5 and not y for c, y in zip(confidence, correct)) / len(correct)
    assert holistic["selective"]["confident_wrong_rate"] == pytest.approx(wrong)

    # Robustness: exact match of transformers' answers to the perturbed prompts.
    right = {"clean": correct}
    for kind in PERTURBATIONS:
        right[kind] = [greedy(hf, perturb(q, kind))[0] == a for q, a in zip(questions, answers)]
        assert holistic["robustness"]["scores"][kind] == pytest.approx(sum(right[kind]) / len(answers))
    drops = [sum(correct) / len(correct) - sum(right[k]) / len(answers) for k in PERTURBATIONS]
    assert holistic["robustness"]["mean_drop"] == pytest.approx(sum(drops) / len(drops))
    assert holistic["robustness"]["worst_drop"] == pytest.approx(max(drops))
    assert holistic["robustness"]["worst_case"] == pytest.approx(sum(map(all, zip(*right.values()))) / len(answers))

    # Fairness: every question names a swapped person; the answers to the swapped questions, by transformers.
    swapped = [greedy(hf, swap_terms(q, swaps))[0] for q in questions]
    fair = holistic["fairness"]
    assert fair["items"] == len(questions)
    assert fair["counterfactual"] == pytest.approx(
        sum(s == swap_terms(a, swaps) for s, a in zip(swapped, answers)) / len(answers))
    assert fair["gap"] == pytest.approx(sum(correct) / len(correct) - fair["counterfactual"])
    changed = [swap_terms(text, swaps) != s for (text, *_), s in zip(oracle, swapped)]
    assert fair["change_rate"] == pytest.approx(sum(changed) / len(changed))

    # Toxicity: the classifier's own scores of the outputs.
    from profanity_check import predict_prob

    scores = predict_prob([s["output"] for s in samples])
    assert holistic["toxicity"]["toxicity_mean"] == pytest.approx(float(scores.mean()))
    assert holistic["toxicity"]["toxicity_max"] == pytest.approx(float(scores.max()))

    # Efficiency: forward FLOPs of each prompt and its generated tokens, from config.json by hand.
    config = json.loads((checkpoint / "config.json").read_text())
    d, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    kv = config["num_key_value_heads"] * head_dim
    matmul = layers * (d * (heads * head_dim + 2 * kv) + heads * head_dim * d + 3 * d * config["intermediate_size"]) \
        + config["vocab_size"] * d
    lengths = [prompt + generated for *_, prompt, generated in oracle]
    flops = sum(2 * matmul * n + 4 * layers * heads * head_dim * n * (n + 1) // 2 for n in lengths) / len(lengths)
    assert holistic["efficiency"]["flops_per_item"] == pytest.approx(flops)
    assert holistic["efficiency"]["generated_tokens"] == sum(generated for *_, generated in oracle)

    report = (out.parent / "report.md").read_text()
    assert "**Calibration**" in report and "![reliability diagram](reliability.png)" in report
    for png in ("reliability.png", "coverage.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ece = float(re.search(r"calibration +ECE ([\d.]+)", printed).group(1))
    assert ece == pytest.approx(holistic["calibration"]["ece"], abs=5e-4)


def test_eval_calibration_of_multiple_choice(tmp_path, checkpoint):
    rng = __import__("random").Random(0)
    records = []
    for question, answer in facts(TEST_TRAINED):
        others = sorted({a for _, a in facts(range(8))} - {answer})
        choices = rng.sample([answer, *rng.sample(others, 2)], 3)
        records.append({"question": question, "choices": choices, "answer_index": choices.index(answer)})
    task = write_jsonl(tmp_path / "mc.jsonl", records)
    out = tmp_path / "mc" / "results.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", str(task), "--metrics", "calibration,selective",
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results["holistic"]) == ["accuracy", "calibration", "selective"]
    brier = 0.0
    for s in results["samples"]:
        weights = [math.exp(ll) for ll in s["loglikelihoods"]]
        probabilities = [w / sum(weights) for w in weights]
        assert s["probabilities"] == pytest.approx(probabilities)
        assert s["confidence"] == pytest.approx(max(probabilities))
        brier += sum((p - (k == s["answer_index"])) ** 2 for k, p in enumerate(probabilities))
    assert results["holistic"]["calibration"]["multiclass_brier"] == pytest.approx(brier / len(records))


@pytest.mark.parametrize("args, message", [
    (["--metrics", "accuracy,speed"], "unknown metric group(s): speed"),
    (["--metrics", "all", "--swaps", "{missing}"], "missing.json"),
    (["--swaps", "{swaps}"], "--swaps goes with --metrics"),
])
def test_eval_metrics_bad_flags_are_clear_errors(tmp_path, capsys, checkpoint, args, message):
    task = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "answer": a} for q, a in facts(TEST_TRAINED)])
    (tmp_path / "swaps.json").write_text('{"he": "she"}')
    args = [a.format(missing=tmp_path / "missing.json", swaps=tmp_path / "swaps.json") for a in args]
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", str(task), *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_metrics_refuses_a_perplexity_task(tmp_path, capsys, checkpoint):
    task = write_jsonl(tmp_path / "text.jsonl", [{"text": "Alice was born in Port Alder."}])
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", str(task), "--metrics", "all",
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "holistic metrics apply to generation and multiple choice" in capsys.readouterr().err
