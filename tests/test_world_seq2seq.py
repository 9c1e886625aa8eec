"""The world's seq2seq mixture: record shapes, splits disjoint by person, files readable by the seq2seq data
loader, and the held-out eval tasks scored with ROUGE and exact match (checked against hand-computed values)."""

import json

import pytest

from lmforge.data.seq2seq import read_pairs
from lmforge.eval import metrics
from lmforge.eval.registry import build_task, registered_tasks
from lmforge.world.people import make_world
from lmforge.world.seq2seq import (
    QA_INPUT, SUMMARIZE_PREFIX, qa_pairs, summarization_pairs, summary, write_seq2seq_data,
)
from lmforge.world.tasks import register_tasks, world_task


@pytest.fixture(scope="module")
def world():
    return make_world(seed=2, n_people=40, n_companies=4)


def test_summary_states_the_persons_facts(world):
    person = world.people[0]
    line = summary(person)
    assert line.startswith(f"{person.name}, born {person.birth_date.year} in {person.birth_city}, ")
    assert line.endswith(f" works for {person.employer} as {'an' if person.job_title[0] in 'aeiou' else 'a'} "
                         f"{person.job_title}.")


def test_pairs_shapes_and_splits_disjoint_by_person(world):
    train = summarization_pairs(world, "train", biographies=2) + qa_pairs(world, "train")
    heldout = summarization_pairs(world, "heldout") + qa_pairs(world, "heldout")
    train_people = {p.name for p in world.people if p.split == "train"}
    heldout_people = {p.name for p in world.people if p.split == "heldout"}
    assert {p.person for p in train} == train_people and {p.person for p in heldout} == heldout_people
    assert not train_people & heldout_people
    for pair in train + heldout:
        person = world.person(pair.person)
        if pair.task == "summarize":
            assert pair.input.startswith(SUMMARIZE_PREFIX) and pair.target == summary(person)
        else:
            assert pair.input.startswith("question: ") and " context: " in pair.input
            assert pair.target in person.facts().values()
        context = pair.input.split(" context: ", 1)[-1]
        assert person.name in context and person.birth_city in context  # the answer is in the input
    summaries = [p for p in train if p.task == "summarize"]
    assert len(summaries) == 2 * len(train_people)
    assert len({p.input for p in summaries}) == len(summaries)  # two wordings per person
    assert len([p for p in train if p.task == "qa"]) == 7 * len(train_people)
    assert QA_INPUT.format(question="Q?", context="C.") == "question: Q? context: C."


def test_deterministic_and_seeded(world):
    assert summarization_pairs(world, "train") == summarization_pairs(world, "train")
    assert summarization_pairs(world, "train", seed=1) != summarization_pairs(world, "train")
    with pytest.raises(ValueError, match="split must be"):
        qa_pairs(world, "test")


def test_written_jsonl_reads_as_seq2seq_pairs(world, tmp_path):
    paths = write_seq2seq_data(world, tmp_path, "train", biographies=1)
    assert sorted(paths) == ["qa", "summarize"]
    first = json.loads(paths["summarize"].read_text("utf-8").splitlines()[0])
    assert sorted(first) == ["input", "target"]
    pairs = read_pairs(paths["qa"])
    assert [(p.input, p.target) for p in pairs] == [(p.input, p.target) for p in qa_pairs(world, "train")]


def test_heldout_tasks_registered_and_scored_by_rouge_and_exact_match():
    register_tasks(seed=2, people=30)
    assert {"world-summarize-heldout", "world-qa-context-heldout"} <= set(registered_tasks())
    task = build_task("world-summarize-heldout")
    assert task == world_task("world-summarize-heldout", seed=2, people=30) and task.kind == "generation"
    heldout = [p for p in make_world(2, n_people=30, n_companies=4).people if p.split == "heldout"]
    assert [item.answer for item in task.items] == [summary(p) for p in heldout]
    assert all(item.prompt.startswith(SUMMARIZE_PREFIX) for item in task.items)
    assert not {e.answer for e in task.exemplars} & {i.answer for i in task.items}
    qa = build_task("world-qa-context-heldout")
    assert len(qa.items) == 7 * len(heldout)

    # ROUGE by hand. Reference (tokens lowercased, punctuation dropped): "ada lovelace born 1815 in london
    # works for acme as a writer" (12 tokens); prediction: "ada born in london works as a writer" (8).
    reference = "Ada Lovelace, born 1815 in London, works for Acme as a writer."
    prediction = "Ada, born in London, works as a writer."
    # ROUGE-1: 8 shared unigrams: P = 8/8, R = 8/12, F = 0.8. ROUGE-2: shared bigrams "in london", "london
    # works", "as a", "a writer" = 4: P = 4/7, R = 4/11, F = 2PR/(P+R) = 4/9. ROUGE-L: the LCS is the whole
    # prediction (8), so as ROUGE-1.
    scores = metrics.rouge([prediction, reference], [reference, reference])
    assert scores["rouge1"] == pytest.approx((0.8 + 1) / 2)
    assert scores["rouge2"] == pytest.approx((4 / 9 + 1) / 2)
    assert scores["rougeL"] == pytest.approx((0.8 + 1) / 2)
    assert metrics.exact_match(qa.items[0].answer, qa.items[0].answer) == 1.0
    assert metrics.exact_match("Port", qa.items[0].answer + "x") == 0.0
