"""Robustness perturbations and fairness term swaps: each checked against hand-written expectations, a
keyboard laid out independently, binomial bounds on random rates, and a second process with another hash seed."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import pytest

from lmforge.eval import perturb as perturb_module
from lmforge.eval.perturb import (
    DISTRACTORS, PERTURBATIONS, PRONOUN_SWAPS, counterfactual_task, perturb, perturb_task, swap_terms, swapped_items,
)
from lmforge.eval.tasks import ChoiceItem, GenerationItem, Task, TextItem

LONG = ("Which company employs Will Bishop? In which city was Alice Okafor born? What is the favorite hobby of "
        "Bola Ade, and where did she study?\nChoose the correct answer. ") * 20


def test_kinds_are_deterministic_per_seed_and_vary_across_seeds():
    for kind in PERTURBATIONS:
        assert perturb(LONG, kind, seed=3) == perturb(LONG, kind, seed=3)
    for kind in ("typos", "whitespace", "synonyms"):
        assert perturb(LONG, kind, seed=0) != perturb(LONG, kind, seed=1)
    assert len({perturb("Hello.", "distractor", seed) for seed in range(20)}) > 1
    assert {perturb(LONG, "casing", seed) for seed in range(3)} == {LONG.lower()}


def test_perturbations_do_not_depend_on_the_process_hash_seed():
    code = ("import sys; from lmforge.eval.perturb import PERTURBATIONS, perturb; "
            "sys.stdout.write(repr([perturb(sys.argv[1], k, 7) for k in PERTURBATIONS]))")
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", code, LONG], env=env, capture_output=True, text=True, check=True)
        runs.append(done.stdout)
    assert runs[0] == runs[1] == repr([perturb(LONG, k, 7) for k in PERTURBATIONS])


def test_unknown_kind_names_the_kinds():
    kinds = "typos, casing, whitespace, synonyms, distractor"
    with pytest.raises(ValueError, match=f"unknown perturbation 'shout'; choose from {kinds}"):
        perturb("text", "shout")


def _keyboard_neighbours(a: str, b: str) -> bool:
    """Adjacent keys on a QWERTY keyboard: side by side, or touching on the next row (rows staggered by a
    quarter and then half a key)."""
    rows = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
    offsets = (0.0, 0.25, 0.75)
    where = {c: (r, i + offsets[r]) for r, row in enumerate(rows) for i, c in enumerate(row)}
    (ra, xa), (rb, xb) = where[a], where[b]
    return (ra == rb and abs(xa - xb) == 1) or (abs(ra - rb) == 1 and abs(xa - xb) < 1)


def test_typos_replace_about_five_percent_of_letters_by_keyboard_neighbours():
    text = ("The Quick brown fox, aged 12, jumps over 3 lazy dogs! " * 60)
    letters = sum(c.isalpha() for c in text)
    assert 2000 < letters < 2500
    for seed in range(3):
        out = perturb(text, "typos", seed)
        assert len(out) == len(text)
        changed = [(a, b) for a, b in zip(text, out) if a != b]
        # binomial(n ~ 2200, p = 0.05): mean ~ 110, sd ~ 10; 3% and 7.5% are more than 4 sd away
        assert 0.03 * letters < len(changed) < 0.075 * letters
        for a, b in changed:
            assert a.isalpha() and b.isalpha() and a.isupper() == b.isupper()
            assert _keyboard_neighbours(a.lower(), b.lower()), (a, b)
    assert perturb("12345, 678; !?", "typos") == "12345, 678; !?"


def test_casing_lowercases_everything():
    text = "Which Company employs WILL Bishop?\nÉtienne"
    assert perturb(text, "casing") == "which company employs will bishop?\nétienne"


def test_whitespace_keeps_words_and_newlines_and_uses_one_to_three_spaces():
    text = "Where  did\nAlice Okafor     study ?\n\n" + LONG
    out = perturb(text, "whitespace", seed=5)
    assert out.split() == text.split()
    assert [line.split() for line in out.split("\n")] == [line.split() for line in text.split("\n")]
    runs = re.findall(r" +", out)
    assert len(runs) == len(re.findall(r" +", text))
    assert {len(r) for r in runs} == {1, 2, 3}


def _variants(template: str, *options: tuple[str, ...]) -> set[str]:
    return {template.format(*choice) for choice in itertools.product(*options)}


def test_synonyms_replace_only_table_words_by_their_synonyms_and_spare_names(monkeypatch):
    monkeypatch.setitem(perturb_module.SYNONYMS, "will", ("shall",))
    monkeypatch.setitem(perturb_module.SYNONYMS, "bishop", ("priest",))
    cases = {
        "Which company employs Will Bishop?": _variants(
            "{} {} {} Will Bishop?", ("Which", "What"), ("company", "firm", "business"), ("employs", "hires")),
        "What is the favorite hobby of Bishop Lane? It will rain.": _variants(
            "What is the {} {} of Bishop Lane? It {} rain.",
            ("favorite", "favourite", "preferred"), ("hobby", "pastime"), ("will", "shall")),
        "In which city was X born\nWill you pick the field of study at Northgate University?": _variants(
            "In {} {} was X born\n{} you pick the {} at Northgate {}?", ("which", "what"), ("city", "town"),
            ("Will", "Shall"), ("field of study", "area of study", "discipline"), ("University",)),
        "Spare Time Club opens. Spare time is short.": _variants(
            "Spare Time Club opens. {} is short.", ("Spare time", "Free time", "Leisure time")),
    }
    for text, allowed in cases.items():
        seen = {perturb(text, "synonyms", seed) for seed in range(200)}
        assert seen == allowed, text


def test_synonyms_replace_about_half_the_table_words():
    out = perturb("The city. " * 2000, "synonyms", seed=1)
    towns = out.count("town")
    assert out.count("city") + towns == 2000
    assert 920 < towns < 1080  # binomial(2000, 0.5): mean 1000, sd 22


def test_distractor_prepends_one_of_the_sentences():
    text = "Where does Alice Okafor work?"
    outs = {perturb(text, "distractor", seed) for seed in range(40)}
    assert all(any(out == f"{d} {text}" for d in DISTRACTORS) for out in outs)
    assert len(outs) >= 4


def _task() -> Task:
    items = [GenerationItem("Which company employs Will Bishop?", "Bluepeak Labs", "He works there."),
             GenerationItem("In which city was Alice Okafor born?", "Port Alder")]
    return Task("employers", items, exemplars=[GenerationItem("Which city?", "Elmstead")], template="Q: {} A:")


def test_perturb_task_changes_prompts_only():
    task = _task()
    for kind in PERTURBATIONS:
        out = perturb_task(task, kind, seed=2)
        assert out.name == f"employers+{kind}"
        assert out.exemplars == task.exemplars and out.template == task.template
        assert [i.prompt for i in out.items] == [perturb(i.prompt, kind, 2) for i in task.items]
        assert [(i.answer, i.rationale) for i in out.items] == [(i.answer, i.rationale) for i in task.items]
    prompts = {perturb_task(task, "synonyms", seed).items[0].prompt for seed in range(50)}
    assert len(prompts) > 1 and all(p.endswith(" Will Bishop?") for p in prompts)
    assert task.items[0].prompt == "Which company employs Will Bishop?"  # the original is untouched


def test_perturb_task_on_choice_questions_keeps_choices_and_refuses_perplexity():
    task = Task("mc", [ChoiceItem("Which city is  largest?", ("Port Alder", "Elmstead"), 1)])
    out = perturb_task(task, "whitespace", seed=4)
    assert out.items[0].question == perturb("Which city is  largest?", "whitespace", 4)
    assert out.items[0].choices == ("Port Alder", "Elmstead") and out.items[0].answer_index == 1
    with pytest.raises(ValueError, match="robustness applies to generation and multiple-choice tasks"):
        perturb_task(Task("ppl", [TextItem("Some text.")]), "typos")
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_task(task, "noise")


def test_swap_terms_by_hand():
    assert swap_terms("he met she", {"he": "she", "she": "he"}) == "she met he"
    assert swap_terms("He said: he. HE! (he)", PRONOUN_SWAPS) == "She said: she. SHE! (she)"
    assert swap_terms("The theme; hello, she-wolf", PRONOUN_SWAPS) == "The theme; hello, he-wolf"
    assert swap_terms("Her brother gave his book to her.", PRONOUN_SWAPS) == "His sister gave her book to his."
    assert swap_terms("Mr. Okafor and Mrs. Ade", PRONOUN_SWAPS) == "Mrs. Okafor and Mr. Ade"
    names = {"Alice Okafor": "Bola Ade", "Bola Ade": "Alice Okafor", "Alice": "Carol"}
    assert swap_terms("Alice Okafor met Bola\nAde, then Alice and Alicent.", names) == \
        "Bola Ade met Alice Okafor, then Carol and Alicent."
    assert swap_terms("nothing here", {}) == "nothing here"
    with pytest.raises(ValueError, match="maps 'he' twice"):
        swap_terms("he", {"he": "she", "HE": "they"})


def test_counterfactual_task_swaps_prompts_answers_and_choices():
    gen = Task("bio", [GenerationItem("Where does he work?", "He works at his firm.", "His wife said so."),
                       GenerationItem("Where does Alice Okafor work?", "Bluepeak Labs")],
               exemplars=[GenerationItem("Where did he study?", "He studied at Northgate.")])
    out = counterfactual_task(gen, PRONOUN_SWAPS)
    assert out.name == "bio+counterfactual" and out.exemplars == gen.exemplars
    assert out.items[0] == GenerationItem("Where does she work?", "She works at her firm.", "Her husband said so.")
    assert out.items[1] == gen.items[1]
    assert swapped_items(gen, PRONOUN_SWAPS) == [0]

    mc = Task("mc", [ChoiceItem("Who is she?", ("a woman", "a man"), 0), ChoiceItem("Which city?", ("A", "B"), 1)])
    out = counterfactual_task(mc, PRONOUN_SWAPS)
    assert out.items[0] == ChoiceItem("Who is he?", ("a man", "a woman"), 0)
    assert out.items[1] == mc.items[1]
    assert swapped_items(mc, {"B": "C"}) == [1]
    ppl = Task("ppl", [TextItem("He left."), TextItem("It rained.")])
    assert counterfactual_task(ppl, PRONOUN_SWAPS).items == [TextItem("She left."), TextItem("It rained.")]
    assert swapped_items(ppl, PRONOUN_SWAPS) == [0]
    with pytest.raises(ValueError, match="blank key"):
        counterfactual_task(mc, {" ": "x"})
    with pytest.raises(ValueError, match="swaps is empty"):
        counterfactual_task(mc, {})
    with pytest.raises(ValueError, match="swaps is empty"):
        swapped_items(mc, {})
