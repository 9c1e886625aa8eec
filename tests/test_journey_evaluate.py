"""Journey 9, Evaluate like the papers, through the command line: `lmforge eval --checkpoint DIR --task
qa.jsonl --shots 3` (EM, F1, ROUGE, BLEU), a perplexity task, and `lmforge eval --harness lm-eval --tasks
...` on a local lm-evaluation-harness task. The checkpoint is a micro llama trained here to recite some
facts; the oracles are transformers' greedy decoding and log-likelihoods, the SQuAD rules, rouge-score,
sacrebleu and lm-eval's own `hf` model on the same directory."""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from chat_data import write_jsonl
from recite_model import (
    EXEMPLAR_PEOPLE, TEMPLATES, TEST_TRAINED, TEST_UNSEEN, TRAINED, facts, people, recite_checkpoint,
    transformers_model,
)

from lmforge.cli import main

MAX_NEW_TOKENS = 32  # lmforge eval's default for generation tasks


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, chat_base) -> Path:
    return recite_checkpoint(chat_base, tmp_path_factory.mktemp("journey-eval") / "model")


@pytest.fixture(scope="module")
def hf(checkpoint):
    return transformers_model(checkpoint)


def printed_metrics(text: str) -> dict[str, float]:
    """The `name value` rows of `lmforge eval`'s summary."""
    return {name: float(value.replace(",", "")) for name, value in re.findall(r"^  (\w+) +([\d.,]+)$", text, re.M)}


# ---- generation: EM, F1, ROUGE, BLEU -------------------------------------------------------------------


def squad_normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1's evaluate-v1.1.py F1, with both-empty counted as a match."""
    pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def reference_metrics(predictions: list[str], answers: list[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score.rouge_scorer import RougeScorer

    n = len(answers)
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge = [scorer.score(a, p) for p, a in zip(predictions, answers)]
    return {
        "exact_match": sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / n,
        "exact_match_normalized": sum(squad_normalize(p) == squad_normalize(a) for p, a in zip(predictions, answers)) / n,
        "f1": sum(squad_f1(p, a) for p, a in zip(predictions, answers)) / n,
        **{kind: sum(r[kind].fmeasure for r in rouge) / n for kind in ("rouge1", "rouge2", "rougeL")},
        "bleu": sacrebleu.corpus_bleu(predictions, [answers]).score,
    }


def greedy_answer(hf, prompt: str) -> str:
    """transformers' greedy continuation of the document-start token and `prompt`, up to the line's end."""
    model, tokenizer = hf
    ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).split("\n")[0].strip()


@pytest.mark.slow
def test_eval_qa_task_three_shot(tmp_path, capsys, checkpoint, hf):
    test = facts(TEST_TRAINED) + facts(TEST_UNSEEN)
    answers = [a for _, a in test]
    pool = facts(EXEMPLAR_PEOPLE)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "answer": a} for q, a in test])
    write_jsonl(tmp_path / "qa.exemplars.jsonl", [{"prompt": q, "answer": a} for q, a in pool])
    out = tmp_path / "qa-results.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", str(qa), "--shots", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert (results["task"], results["n"], results["shots"]) == ("qa", len(test), 3)

    shown = {f"{q} {a}" for q, a in pool}
    for sample, (question, answer) in zip(results["samples"], test):
        *shots, asked = sample["input"].split("\n\n")
        assert asked == question and sample["answer"] == answer
        assert len(set(shots)) == 3 and set(shots) <= shown

    predictions = [greedy_answer(hf, s["input"]) for s in results["samples"]]
    print("predictions:", list(zip(predictions, answers)))
    assert [s["prediction"] for s in results["samples"]] == predictions
    expected = reference_metrics(predictions, answers)
    assert results["metrics"] == pytest.approx(expected, abs=1e-9)
    assert printed_metrics(printed) == pytest.approx(expected, abs=5e-5)
    assert [s["f1"] for s in results["samples"]] == pytest.approx([squad_f1(p, a) for p, a in zip(predictions, answers)])

    recited = [p == a for p, a in zip(predictions, answers)]
    known = len(facts(TEST_TRAINED))
    assert sum(recited[:known]) / known > sum(recited[known:]) / len(recited[known:])  # trained facts come back
    assert results["metrics"]["bleu"] > 0


def test_eval_credits_reordered_words_in_f1_not_em(tmp_path, checkpoint, hf):
    """An answer holding the prediction's words in another order: exact match 0, F1 1. The answers are
    made from the model's own zero-shot predictions (transformers'), so this holds whatever it learnt."""
    questions = [q for q, _ in facts(TRAINED)]
    said = {q: greedy_answer(hf, q) for q in questions}
    reordered = {q: " ".join(reversed(said[q].split())) for q in questions}
    worded = [q for q in questions if squad_normalize(reordered[q]) != squad_normalize(said[q])]
    assert worded, said
    task = write_jsonl(tmp_path / "reordered.jsonl", [{"prompt": q, "answer": reordered[q]} for q in worded])
    out = tmp_path / "reordered.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", str(task), "--out", str(out)]) == 0
    samples = json.loads(out.read_text())["samples"]
    assert [s["prediction"] for s in samples] == [said[q] for q in worded]
    assert [(s["exact_match"], s["f1"]) for s in samples] == [(0, 1)] * len(worded)


# ---- perplexity ----------------------------------------------------------------------------------------


def test_eval_perplexity_task(tmp_path, capsys, checkpoint, hf):
    seen, unseen = facts(TEST_TRAINED)[:3], facts(TEST_UNSEEN)[:3]
    texts = ["\n\n".join(f"{q} {a}" for q, a in part) for part in (seen, unseen)]
    task = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "ppl.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", str(task), "--out", str(out)]) == 0
    printed = printed_metrics(capsys.readouterr().out)
    results = json.loads(out.read_text())

    model, tokenizer = hf
    nlls, counts = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert len(ids) < model.config.max_position_embeddings
        with torch.no_grad():
            logits = model(torch.tensor([[tokenizer.eos_token_id] + ids])).logits[0, :-1]
        nlls.append(F.cross_entropy(logits, torch.tensor(ids), reduction="sum").item())
        counts.append(len(ids))
    nll, tokens, n_bytes = sum(nlls), sum(counts), sum(len(t.encode()) for t in texts)
    words = sum(len(t.split()) for t in texts)
    expected = {"perplexity": math.exp(nll / tokens), "word_perplexity": math.exp(nll / words),
                "bits_per_byte": nll / (math.log(2) * n_bytes)}
    metrics = results["metrics"]
    assert (metrics["tokens"], metrics["bytes"]) == (tokens, n_bytes)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    assert printed == pytest.approx(metrics, abs=5e-5)
    assert [s["loglikelihood"] for s in results["samples"]] == pytest.approx([-x for x in nlls], rel=1e-5)
    ours = [-s["loglikelihood"] / n for s, n in zip(results["samples"], counts)]
    assert ours[0] < ours[1]  # the facts it was trained on are likelier


# ---- lm-evaluation-harness -------------------------------------------------------------------------------


def write_harness_task(root: Path) -> Path:
    """A local multiple-choice lm-eval task over every fact, 2-shot from the exemplar people's facts."""
    def records(indices: range) -> list[dict]:
        rng = random.Random(indices.start)
        out = []
        for i in indices:
            person = people()[i]
            for attribute, template in TEMPLATES.items():
                answer = person.fact(attribute)
                others = sorted({p.fact(attribute) for p in people()} - {answer})
                choices = rng.sample([answer, *rng.sample(others, 3)], 4)
                out.append({"question": template.format(person.name), "choices": choices,
                            "answer": choices.index(answer)})
        return out

    write_jsonl(root / "mc_test.jsonl", records(range(8)))
    write_jsonl(root / "mc_train.jsonl", records(EXEMPLAR_PEOPLE))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "facts_mc.yaml").write_text(
        "task: facts_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'mc_test.jsonl'}\n    train: {root / 'mc_train.jsonl'}\n"
        "test_split: test\nfewshot_split: train\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "num_fewshot: 2\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return tasks


def table_values(table: str) -> dict[str, float]:
    """{metric: value} of lm-eval's markdown table for one task (shown 2-shot)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    header = rows[0]
    values = {}
    for row in rows[2:]:
        cells = dict(zip(header, row))
        assert cells["Tasks"] in ("facts_mc", "") and cells["n-shot"] == "2"
        values[cells["Metric"]] = float(row[header.index("Value")])
    return values


@pytest.mark.slow
def test_eval_lm_eval_harness_task_matches_lm_evals_hf_model(tmp_path, capsys, checkpoint):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = write_harness_task(tmp_path)
    out = tmp_path / "harness.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--harness", "lm-eval", "--tasks", "facts_mc",
                 "--include-path", str(tasks), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    ours = json.loads(out.read_text())["results"]["facts_mc"]

    reference = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(checkpoint), device="cpu", batch_size=8), tasks=["facts_mc"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), fewshot_random_seed=0,
        bootstrap_iters=0)["results"]["facts_mc"]
    print(f"acc {ours['acc,none']:.4f} (lm-eval hf {reference['acc,none']:.4f}), "
          f"acc_norm {ours['acc_norm,none']:.4f} (lm-eval hf {reference['acc_norm,none']:.4f})")
    assert (ours["acc,none"], ours["acc_norm,none"]) == (reference["acc,none"], reference["acc_norm,none"])
    assert table_values(table) == pytest.approx({m: reference[f"{m},none"] for m in ("acc", "acc_norm")}, abs=5e-5)
    assert ours["acc,none"] > 0.5  # four choices: the trained facts are recognised
