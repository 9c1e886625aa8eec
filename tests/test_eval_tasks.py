"""Eval tasks: file formats and bad records, exemplar pools and few-shot prompts, built-in world
tasks, and scoring against independent oracles (transformers' log-likelihoods, perplexity by hand,
a model trained to prefer the answers)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.eval.registry import registered_tasks
from lmforge.eval.runner import document_prefix, encode_continuation, evaluate, load_task, run_eval
from lmforge.eval.tasks import (
    COT_CUE, ChoiceItem, GenerationItem, Task, TextItem, draw_exemplars, extract_answer,
    generation_text, load_task_file,
)
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.io import RecordError
from lmforge.model import Transformer
from lmforge.presets import preset
from lmforge.tokenizer import train_tokenizer
from lmforge.world.documents import biography, questions, write_pretraining_corpus
from lmforge.world.people import make_world
from lmforge.world.tasks import WORLD_TASKS, register_tasks, world_task

CONTEXT = 256


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A micro llama (random weights, sharpened) with a BPE tokenizer trained on the world, as an HF directory."""
    root = tmp_path_factory.mktemp("eval")
    corpus = write_pretraining_corpus(make_world(0, n_people=20, n_companies=4), root / "corpus.jsonl", variants=1)
    tokenizer = train_tokenizer([corpus], 400, root / "tok", show_progress=False)
    model = Transformer(preset("micro", vocab_size=tokenizer.vocab_size, max_position_embeddings=CONTEXT,
                               bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                               pad_token_id=tokenizer.pad_id))
    model.init_weights(seed=0)
    with torch.no_grad():  # decisive logits, so that a scoring mistake moves them visibly
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    return save_model(model, root / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def session(checkpoint) -> Session:
    return Session.load(checkpoint)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


MC = {"question": "Alice was born in", "choices": ["Vantor", "Eastbrook", "Millhaven"], "answer_index": 1}
QA = {"prompt": "Where was Alice born?", "answer": "Vantor"}


# ---- files, records, exemplar pools ---------------------------------------------------------------


def test_task_file_with_sibling_exemplars_and_task_directory(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [QA, {**QA, "answer": "Eastbrook", "rationale": "ignored here"}])
    write_jsonl(tmp_path / "qa.exemplars.jsonl", [{"prompt": "Where was Bruno born?", "answer": "Eastbrook"}])
    task = load_task_file(tmp_path / "qa.jsonl")
    assert (task.name, task.kind, len(task.items), len(task.exemplars)) == ("qa", "generation", 2, 1)
    assert task.items[1] == GenerationItem("Where was Alice born?", "Eastbrook", "ignored here")

    folder = tmp_path / "mc"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [MC, "", {**MC, "extra": "kept out of the way"}])
    write_jsonl(folder / "train.jsonl", [MC] * 3)
    task = load_task(folder)
    assert (task.kind, len(task.items), len(task.exemplars)) == ("choice", 2, 3)
    assert task.items[0] == ChoiceItem("Alice was born in", ("Vantor", "Eastbrook", "Millhaven"), 1)
    assert load_task_file(write_jsonl(tmp_path / "ppl.jsonl", [{"text": "hello"}])).items == [TextItem("hello")]

    register_tasks()
    with pytest.raises(FileNotFoundError, match="no task file or directory .*built-in: world-qa-heldout"):
        load_task(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no test.jsonl"):
        load_task(tmp_path / "empty")
    write_jsonl(tmp_path / "mixed.jsonl", [QA])
    write_jsonl(tmp_path / "mixed.exemplars.jsonl", [MC])
    with pytest.raises(ValueError, match="choice exemplars for a generation task"):
        load_task(tmp_path / "mixed.jsonl")


@pytest.mark.parametrize("record, where", [
    ("{not json", "field '<record>': not valid JSON"),
    (["a list"], "field '<record>': expected a JSON object"),
    ({"label": 3}, "field 'question': missing"),
    ({**MC, "answer_index": 3}, "field 'answer_index': 3 is out of range for 3 choices (0 to 2)"),
    ({**MC, "answer_index": -1}, "field 'answer_index': -1 is out of range"),
    ({**MC, "answer_index": True}, "field 'answer_index': must be an integer"),
    ({"question": "q", "choices": ["a", "b"]}, "field 'answer_index': missing"),
    ({**MC, "choices": "Vantor"}, "field 'choices': must be a list of at least two strings"),
    ({**MC, "choices": ["Vantor", ""]}, "field 'choices[1]': must be a non-empty string"),
    (QA, "field 'question': missing"),  # a generation record in a multiple-choice file
])
def test_bad_multiple_choice_records_name_file_line_and_field(tmp_path, record, where):
    path = write_jsonl(tmp_path / "bad.jsonl", [MC, "", record])
    with pytest.raises(RecordError) as e:
        load_task(path)
    assert str(e.value).startswith(f"{path}:3: {where}")


@pytest.mark.parametrize("records, where", [
    ([{"label": 3}], "1: field '<record>': expected {'prompt', 'answer'} (generation)"),
    ([{"prompt": "q"}], "1: field 'answer': missing"),
    ([{"prompt": "q", "answer": 3}], "1: field 'answer': must be a string, got int"),
    ([{"prompt": " ", "answer": "a"}], "1: field 'prompt': empty"),
    ([QA, {**QA, "rationale": ["x"]}], "2: field 'rationale': must be a string, got list"),
    ([{"text": "a"}, {"text": ""}], "2: field 'text': empty"),
])
def test_bad_generation_and_text_records(tmp_path, records, where):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(RecordError) as e:
        load_task(path)
    assert str(e.value).startswith(f"{path}:{where}")


def test_empty_task_file(tmp_path):
    with pytest.raises(ValueError, match="no records"):
        load_task(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_shots_beyond_the_exemplar_pool_are_clear_errors(tmp_path, session):
    write_jsonl(tmp_path / "qa.jsonl", [QA])
    with pytest.raises(ValueError, match=r"1 shots asked for but the exemplar pool has 0 records.*qa.exemplars.jsonl"):
        evaluate(session, load_task(tmp_path / "qa.jsonl"), shots=1)
    write_jsonl(tmp_path / "qa.exemplars.jsonl", [{"prompt": "Where was Bruno born?", "answer": "Eastbrook"}, QA])
    task = load_task(tmp_path / "qa.jsonl")
    with pytest.raises(ValueError, match="3 shots asked for but the exemplar pool has 2 records: .*qa.exemplars.jsonl"):
        evaluate(session, task, shots=3)
    # The pool holds the test item itself: it is never shown, so only one exemplar is left for it.
    with pytest.raises(ValueError, match="only 1 exemplars differ from a test item"):
        evaluate(session, task, shots=2)


def test_modes_that_do_not_apply_are_errors(tmp_path, session):
    mc = load_task(write_jsonl(tmp_path / "mc.jsonl", [MC]))
    with pytest.raises(ValueError, match="chain of thought applies to generation tasks"):
        evaluate(session, mc, cot=True)
    with pytest.raises(ValueError, match="perplexity task"):
        evaluate(session, load_task(write_jsonl(tmp_path / "p.jsonl", [{"text": "x"}])), chat=True)
    with pytest.raises(ValueError, match="perplexity tasks take no few-shot"):
        evaluate(session, Task("p", [TextItem("x")], [TextItem("y")]), shots=1)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        evaluate(session, mc, limit=0)


# ---- prompts ----------------------------------------------------------------------------------------


def test_few_shot_prompts_hold_exactly_k_exemplars_from_the_pool(session):
    task = world_task("world-qa-heldout", people=30)
    test_prompts = {item.prompt for item in task.items}
    pool = {item.prompt: item.answer for item in task.exemplars}

    def inputs(seed: int, chat: bool = False) -> list:
        results = evaluate(session, task, shots=3, limit=4, seed=seed, chat=chat, sampling=greedy(4), progress=False)
        return [s["input"] for s in results["samples"]]

    for chat in (False, True):
        for shown_input, item in zip(inputs(5, chat), task.items):
            if chat:
                assert [t["role"] for t in shown_input] == ["user", "assistant"] * 3 + ["user"]
                assert shown_input[-1]["content"] == item.prompt
                shown = [(shown_input[i]["content"], shown_input[i + 1]["content"]) for i in range(0, 6, 2)]
            else:
                blocks = shown_input.split("\n\n")
                assert len(blocks) == 4 and blocks[-1] == f"Question: {item.prompt}\nAnswer:"
                shown = [tuple(b.removeprefix("Question: ").split("\nAnswer: ")) for b in blocks[:3]]
            assert len(set(shown)) == 3 and all(pool[q] == a for q, a in shown)
            assert not {q for q, _ in shown} & test_prompts
    assert inputs(5) == inputs(5) != inputs(6)


def test_draw_exemplars_never_shows_the_item_itself():
    items = [GenerationItem(f"q{i}", f"a{i}") for i in range(5)]
    task = Task("t", items[:2], items)
    rng = random.Random(0)
    for _ in range(20):
        assert items[0] not in draw_exemplars(task, items[0], 4, rng)


def test_chain_of_thought_prompt_and_answer_extraction():
    task = Task("t", [GenerationItem("Q: 2+2?", "4")], template="{}\nA:")
    exemplar = GenerationItem("Q: 1+1?", "2", rationale="One and one make two.")
    assert generation_text(task, task.items[0], [exemplar], cot=True) == (
        f"Q: 1+1?\nA: {COT_CUE} One and one make two. The answer is 2.\n\nQ: 2+2?\nA: {COT_CUE}")
    assert generation_text(task, task.items[0], [exemplar], cot=False) == "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA:"
    assert extract_answer("Two and two. So the answer is 4. Done.", cot=True) == "4"
    assert extract_answer("the answer is: Port Alder.\nThe Answer is Eastbrook", cot=True) == "Eastbrook"
    assert extract_answer("It was born on March 4, 1987.", cot=True) == "It was born on March 4, 1987."
    assert extract_answer("thinking...\nPort Alder\n", cot=True) == "Port Alder"
    assert extract_answer("  Port Alder \n", cot=False) == "Port Alder"


# ---- built-in world tasks ---------------------------------------------------------------------------


def test_builtin_world_tasks_are_deterministic_and_well_formed():
    world = make_world(0, n_people=100, n_companies=10)  # the demo's world
    held = {p.name for p in world.people if p.split == "heldout"}
    mc = world_task("world-mc")
    assert mc == world_task("world-mc") and mc != world_task("world-mc", seed=1)
    assert mc.kind == "choice" and len(mc.items) == 7 * len([p for p in world.pretraining_people() if p.name in held])
    facts = {p.name: p.facts() for p in world.people}
    for item in mc.items + mc.exemplars:
        person = next(name for name in facts if item.question.startswith(name + " ") or
                      item.question.startswith(name + "'"))
        attribute = next(a for a, v in facts[person].items() if v == item.choices[item.answer_index])
        assert len(set(item.choices)) == 4
        others = {facts[p][attribute] for p in facts if p != person}
        assert all(c in others for i, c in enumerate(item.choices) if i != item.answer_index)
        assert (person in held) == (item in mc.items)  # test items about held-out people, exemplars not
    qa = world_task("world-qa-heldout")
    assert [(i.prompt, i.answer) for i in qa.items] == [(q.question, q.answer) for q in questions(world, "heldout")]
    assert not {i.prompt for i in qa.items} & {e.prompt for e in qa.exemplars}
    train = world_task("world-qa-train")
    assert not {i.prompt for i in train.items} & {e.prompt for e in train.exemplars}
    bios = world_task("world-bios")
    assert bios.kind == "perplexity" and len(bios.items) == len(held)


# ---- scoring against oracles ------------------------------------------------------------------------


def transformers_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    logits = model(torch.tensor([context + continuation])).logits[0].float()
    logp = F.log_softmax(logits[len(context) - 1 : -1], dim=-1)
    return logp.gather(1, torch.tensor(continuation)[:, None]).sum().item()


@pytest.mark.parametrize("chat", [False, True])
def test_choice_loglikelihoods_equal_transformers(checkpoint, session, chat):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).float().eval()
    task = world_task("world-mc", people=30)
    # Batches of 9 sequences: two questions' contexts of different lengths share a batch.
    results = evaluate(session, task, shots=2, limit=6, seed=1, chat=chat, batch_size=9, progress=False)
    tokenizer = session.tokenizer
    for sample, item in zip(results["samples"], task.items):
        if chat:
            context = tokenizer.apply_chat_template(sample["input"], add_generation_prompt=True)
            assert sample["input"][-1]["content"] == item.question and len(sample["input"]) == 5
        else:
            context = sample["input"]
            assert context.endswith("\n\n" + item.question) and context.count("\n\n") == 2
        prefix = [] if chat else [document_prefix(tokenizer)]
        for choice, got in zip(item.choices, sample["loglikelihoods"]):
            head, tail = encode_continuation(tokenizer, context, choice if chat else " " + choice)
            assert tokenizer.decode(tail).strip() == choice
            with torch.no_grad():
                assert got == pytest.approx(transformers_loglikelihood(hf, prefix + head, tail), abs=1e-4)
        assert sample["prediction"] == max(range(4), key=lambda i: sample["loglikelihoods"][i])
    assert results["metrics"]["acc"] == sum(s["prediction"] == s["answer_index"] for s in results["samples"]) / 6


def test_perplexity_is_exp_of_the_mean_token_loss_by_hand(tmp_path, session):
    world = make_world(0, n_people=20, n_companies=4)
    rng = random.Random(0)
    texts = ["Alice was born in Vantor.", biography(world.people[0], world, rng),
             " ".join(biography(p, world, rng) for p in world.people[1:4])]  # longer than the context
    tokenizer, model = session.tokenizer, session.model
    documents = [tokenizer.encode(t) for t in texts]
    assert len(documents[2]) > 2 * CONTEXT
    prefix = document_prefix(tokenizer)
    assert prefix == tokenizer.eos_id  # this tokenizer adds no BOS: documents start after an EOS, as in pretraining
    nll = 0.0
    with torch.no_grad():
        for doc in documents:
            sequence, done = [prefix] + doc, 0
            while done < len(doc):  # windows of up to CONTEXT predictions, each read with the tokens before it
                end = min(done + CONTEXT, len(doc))
                inputs = sequence[max(0, end - CONTEXT) : end]
                logits = model(torch.tensor([inputs]))[0, -(end - done) :]
                targets = torch.tensor(sequence[done + 1 : end + 1])
                nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
                done = end
    results = evaluate(session, load_task(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])),
                       batch_size=4, progress=False)
    tokens, n_bytes = sum(map(len, documents)), sum(len(t.encode()) for t in texts)
    assert results["metrics"]["tokens"] == tokens and results["metrics"]["bytes"] == n_bytes
    assert results["metrics"]["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert results["metrics"]["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert sum(s["loglikelihood"] for s in results["samples"]) == pytest.approx(-nll, rel=1e-5)


def test_generation_batched_equals_one_at_a_time_and_exact_match_counts(tmp_path, session):
    records = [{"prompt": p, "answer": "?"} for p in
               ["Alice was born in", "The headquarters of", "Isaac studied at", "Hello", "In short, Nora"]]
    task = load_task(write_jsonl(tmp_path / "g.jsonl", records))
    alone = evaluate(session, task, batch_size=1, sampling=greedy(8), progress=False)
    outputs = [s["output"] for s in alone["samples"]]
    assert all("\n" not in o for o in outputs)  # raw-text answers end at the line's end
    answers = [o.strip() if i % 2 else "not this" for i, o in enumerate(outputs)]
    task = load_task(write_jsonl(tmp_path / "g.jsonl", [{**r, "answer": a} for r, a in zip(records, answers)]))
    batched = evaluate(session, task, batch_size=3, sampling=greedy(8), progress=False)
    assert [s["output"] for s in batched["samples"]] == outputs  # left-padded batches change nothing
    assert batched["metrics"]["exact_match"] == pytest.approx(2 / 5)
    assert [s["exact_match"] for s in batched["samples"]] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert batched["temperature"] == 0.0 and batched["max_new_tokens"] == 8

    def sampled(seed: int) -> list[str]:
        results = evaluate(session, task, sampling=SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50), seed=seed,
                           progress=False)
        return [s["output"] for s in results["samples"]]

    assert sampled(1) == sampled(1) != sampled(2)


def test_multiple_choice_picks_the_answer_a_trained_model_prefers(session):
    """Train a micro model on four sentences; scoring must then pick each sentence's ending."""
    tokenizer = session.tokenizer
    drinks = ["tea", "coffee", "milk", "cocoa"]
    people = ["Alice Okafor", "Bruno Tanaka", "Carmen Novak", "Dalia Haddad"]
    items = [ChoiceItem(f"{person} likes to drink", tuple(drinks), i) for i, person in enumerate(people)]
    task = Task("drinks", items)
    torch.manual_seed(0)
    model = Transformer(session.model.config.model_copy(update={"max_position_embeddings": 32}))
    model.init_weights(seed=1)
    trained = Session(model, tokenizer, Engine(model))
    assert evaluate(trained, task, progress=False)["metrics"]["acc"] < 1

    rows = [[tokenizer.eos_id] + tokenizer.encode(f"{p} likes to drink {d}.") for p, d in zip(people, drinks)]
    longest = max(map(len, rows))
    batch = torch.tensor([r + [tokenizer.pad_id] * (longest - len(r)) for r in rows])
    labels = torch.tensor([r[1:] + [-100] * (longest - len(r)) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    results = evaluate(trained, task, progress=False)
    assert results["metrics"] == {"acc": 1.0, "acc_norm": 1.0}
    for sample in results["samples"]:
        lls = sample["loglikelihoods"]
        assert lls[sample["answer_index"]] > max(ll for i, ll in enumerate(lls) if i != sample["answer_index"]) + 1


def test_world_tasks_register_with_the_eval_registry():
    register_tasks(seed=1, people=30)
    assert set(WORLD_TASKS) <= set(registered_tasks())
    for name in WORLD_TASKS:
        assert load_task(name) == world_task(name, seed=1, people=30)
    register_tasks()
    assert load_task("world-mc") == world_task("world-mc") != world_task("world-mc", seed=1, people=30)


def test_run_eval_loads_checkpoint_and_builtin_task(checkpoint):
    register_tasks(people=30)
    results = run_eval(checkpoint, "world-mc", shots=1, limit=3, progress=False)
    assert results["checkpoint"] == str(checkpoint) and results["task"] == "world-mc"
    assert (results["n"], results["shots"], set(results["metrics"])) == (3, 1, {"acc", "acc_norm"})
    expected = world_task("world-mc", people=30).items[:3]
    assert [s["choices"] for s in results["samples"]] == [list(i.choices) for i in expected]
    json.dumps(results)  # the --out file


def test_eval_command_builds_world_tasks_from_the_world_flags(tmp_path, checkpoint):
    out = tmp_path / "results.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "world-mc", "--world-seed", "1",
                 "--world-people", "30", "--limit", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    expected = world_task("world-mc", seed=1, people=30).items[:2]
    assert [s["choices"] for s in results["samples"]] == [list(i.choices) for i in expected]
