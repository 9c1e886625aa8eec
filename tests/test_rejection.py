"""`lmforge rejection-sample`: best-of selection, prompt formats, sampling, and rounds end to end with
a deterministic scorer (the kept responses are the best candidates, the data is valid SFT data,
each round fine-tunes and samples from the previous round's model)."""

from __future__ import annotations

import json
from difflib import SequenceMatcher
from pathlib import Path

import pytest
from chat_data import write_jsonl

from lmforge.align.rejection import (
    best_of, encode_prompts, load_rejection_config, rejection_sample, sample_candidates,
)
from lmforge.data.chat import read_messages, read_prompts
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete
from lmforge.io import RecordError
from lmforge.world.documents import questions, write_instruction_data
from lmforge.world.people import make_world

USER = {"role": "user", "content": "Where was Alice born?"}
ANSWER = {"role": "assistant", "content": "Port Alder"}


class AnswerScorer:
    """A deterministic stand-in for the reward model: how closely a response matches the true answer."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def score(self, prompts: list[list[dict]], responses: list[str], batch_size: int = 32) -> list[float]:
        return [SequenceMatcher(None, response, self.answers[prompt[-1]["content"]]).ratio()
                for prompt, response in zip(prompts, responses)]


def test_best_of_picks_the_argmax_of_each_prompt():
    assert best_of([[0.1, 0.7, 0.3], [2.0, -1.0], [-3.0, -3.0, -2.5], [5.0]]) == [1, 0, 2, 0]
    assert best_of([[0.4, 0.4, 0.1]]) == [0]  # a tie keeps the first
    with pytest.raises(ValueError):
        best_of([[1.0], []])


def test_prompts_from_prompt_preference_and_sft_files(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Where was Alice born?"},
        {"prompt": [system, USER], "chosen": "Port Alder", "rejected": "No idea"},
        {"messages": [USER, ANSWER, {"role": "user", "content": "And Bruno?"}, ANSWER]},
        {"instruction": "Where was Alice born?", "output": "Port Alder"},
        "",
    ])
    prompts = read_prompts(path, sft_records=True)
    assert [p.messages for p in prompts] == [[USER], [system, USER], [USER, ANSWER, {"role": "user", "content":
                                                                                     "And Bruno?"}], [USER]]
    assert [p.line for p in prompts] == [1, 2, 3, 4]


@pytest.mark.parametrize("record, where", [
    ({"prompt": "  "}, "field 'prompt': empty"),
    ({"prompt": [USER, ANSWER]}, "field 'prompt': ends with an assistant turn"),
    ({"messages": [ANSWER]}, "field 'messages': no turn before"),
    ({"text": "hi"}, "field '<record>'"),
    ("[1]", "field '<record>': expected a JSON object"),
])
def test_bad_prompts_name_file_and_line(tmp_path, record, where):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, record])
    with pytest.raises(RecordError) as e:
        read_prompts(path, sft_records=True)
    assert str(e.value).startswith(f"{path}:2: {where}")


def test_sample_candidates_batches_k_samples_per_prompt(tmp_path, chat_base):
    session = Session.load(chat_base)
    prompts = encode_prompts(session, read_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"},
                                                                                       {"prompt": [USER]}])))
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    candidates = sample_candidates(session, prompts, 3, greedy, batch_size=4)  # rows 0-3, then 4-5
    expected = [c.text.strip() for c in complete(session.engine, session.tokenizer, prompts, greedy)]
    assert candidates == [[text] * 3 for text in expected]
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    once = sample_candidates(session, prompts, 3, sampled, batch_size=4)
    assert once == sample_candidates(session, prompts, 3, sampled, batch_size=4)
    assert len({text for cs in once for text in cs}) > 2  # samples differ within and across batches


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """Questions about the world as a prompts file, their answers, and SFT data to mix in."""
    world = make_world(0, n_people=20, n_companies=4)
    root = tmp_path_factory.mktemp("rs-data")
    chosen = questions(world, "train")[:8]
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": q.question} for q in chosen])
    return prompts, {q.question: q.answer for q in chosen}, write_instruction_data(world, root / "sft.jsonl")


def recipe(tmp_path: Path, base: Path, prompts: Path, extra_sft: Path) -> Path:
    config = {"out_dir": str(tmp_path / "out"), "base": str(base), "prompts": str(prompts),
              "reward": str(tmp_path / "no-reward-model"), "rounds": 2,
              "sampling": {"k": 4, "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, "batch_size": 12},
              "sft": {"data": {"max_len": 128, "val_fraction": 0.0, "datasets": [{"path": str(extra_sft),
                                                                                 "weight": 0.5}]},
                      "adapter": {"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
                      "train": {"steps": 2, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 0,
                                "save_every": 100}}}
    path = tmp_path / "rs.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_rounds_keep_the_best_candidates_and_fine_tune_on_them(tmp_path, chat_base, qa, capsys):
    prompts, answers, extra = qa
    scorer = AnswerScorer(answers)
    out = rejection_sample(load_rejection_config(recipe(tmp_path, chat_base, prompts, extra), []), scorer=scorer)
    printed = capsys.readouterr().out
    root = tmp_path / "out"
    assert out == root / "round-2" / "sft" / "adapter" and (out / "adapter_model.safetensors").is_file()

    rounds = [json.loads(line) for line in (root / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["policy"] == str(chat_base) and rounds[1]["policy"] == str(root / "round-1" / "model")
    for r in rounds:
        print(f"round {r['round']}: mean best score {r['mean_best_score']:.3f}, mean score {r['mean_score']:.3f}")
        assert r["mean_best_score"] >= r["mean_score"] and r["samples"] == 8 * 4
        assert f"round {r['round']}: mean best score {r['mean_best_score']:.4f}" in printed

        round_dir = root / f"round-{r['round']}"
        candidates = [json.loads(line) for line in (round_dir / "candidates.jsonl").read_text().splitlines()]
        kept = [json.loads(line) for line in (round_dir / "best.jsonl").read_text().splitlines()]
        assert len(candidates) == len(kept) == 8
        for c, k in zip(candidates, kept):
            scores = scorer.score([c["prompt"]] * 4, c["responses"])
            assert c["scores"] == pytest.approx(scores)
            assert k["messages"] == c["prompt"] + [{"role": "assistant", "content": c["responses"][c["best"]]}]
            assert k["score"] == max(scores) and k["candidates"]["mean"] == pytest.approx(sum(scores) / 4)
        assert [m for _, m in read_messages(round_dir / "best.jsonl")] == [k["messages"] for k in kept]
        assert r["mean_best_score"] == pytest.approx(sum(k["score"] for k in kept) / 8)
        assert (round_dir / "sft" / "metrics.jsonl").is_file()


def test_a_prompt_longer_than_the_context_is_named(tmp_path, chat_base, qa):
    prompts, answers, extra = qa
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}, {"prompt": "where " * 200}])
    config = load_rejection_config(recipe(tmp_path, chat_base, prompts, extra), [f"prompts={bad}"])
    with pytest.raises(ValueError, match=rf"^{bad}:2: field 'prompt': \d+ tokens leave no room"):
        rejection_sample(config, scorer=AnswerScorer(answers))


def test_bad_recipe_names_the_field(tmp_path, chat_base, qa):
    load_rejection_config(Path(__file__).parents[1] / "configs" / "rejection-tiny.yaml", [])  # the shipped recipe
    path = recipe(tmp_path, chat_base, *qa[::2])
    with pytest.raises(ValueError, match="sampling.k"):
        load_rejection_config(path, ["sampling.k=0"])
    with pytest.raises(ValueError, match="prompt cannot be merged"):
        load_rejection_config(path, ["sft.adapter.method=prompt"])


def test_include_greedy_makes_the_greedy_reply_the_first_candidate(tmp_path, chat_base, qa):
    prompts, answers, extra = qa
    config = load_rejection_config(recipe(tmp_path, chat_base, prompts, extra),
                                   ["rounds=1", "sampling.include_greedy=true"])
    rejection_sample(config, scorer=AnswerScorer(answers))
    session = Session.load(chat_base)
    params = SamplingParams(max_new_tokens=12, temperature=0,
                            stop_token_ids=session.greedy(1).stop_token_ids)
    greedy = [c.text.strip() for c in complete(session.engine, session.tokenizer,
                                               encode_prompts(session, read_prompts(prompts)), params)]
    candidates = [json.loads(line) for line in (tmp_path / "out" / "round-1" / "candidates.jsonl").open()]
    assert [c["responses"][0] for c in candidates] == greedy
    assert all(len(c["responses"]) == 5 and c["scores"][c["best"]] >= c["scores"][0] for c in candidates)
    assert json.loads((tmp_path / "out" / "rounds.jsonl").read_text())["samples"] == 8 * 5
