"""`lmforge demo` at a tiny size, run once: one test per stage. Every figure the report states is
recomputed from the artefacts the run wrote (metrics logs, models, data files), summary.json and
report.md agree, the report's conclusions follow from the figures, and each stage moves its measure
the way the stage exists for."""

from __future__ import annotations

import io
import json
import random
import re

import pytest
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.demo.alignment import (
    PPO_TARGET_KL, learnable_conclusion, naming_conclusion, policy_conclusion, prompted_conclusion,
    reward_model_conclusion,
)
from lmforge.demo.alignment_goals import alignment_goals, goals_table
from lmforge.demo.common import change
from lmforge.demo.holistic import (
    DONT_KNOW_MODEL, HOLISTIC_COVERAGE_PNG, HOLISTIC_RELIABILITY_PNG, conclusions, holistic_row,
)
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete, stop_token_ids
from lmforge.rag.store import Store
from lmforge.world.documents import fact_probes, questions
from lmforge.world.people import make_world
from lmforge.world.preferences import FLAWS
from lmforge.world.store import context_documents

PEOPLE, PROBES = 12, 300


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Journey 1: `lmforge demo`, once for every test here; (out dir, report text, summary.json)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--out", str(out), "--people", str(PEOPLE), "--steps", "30", "--sft-steps", "6",
                 "--align-steps", "4", "--t5-steps", "8"]) == 0
    return out, (out / "report.md").read_text(), json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def world():
    return make_world(0, n_people=PEOPLE, n_companies=4)


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_has_every_section(run):
    _, report, summary = run
    for section in ("## The world", "## Tokenizer", "## Pretraining", "## What pretraining taught",
                    "## Instruction tuning", "## Prompting", "## Alignment", "## Retrieval", "## Summary",
                    "## Holistic evaluation", "## Encoder-decoder",
                    "## Real sizes"):
        assert section in report
    assert "| llama2-7b | 6.74 B |" in report
    assert (summary["seed"], summary["people"], summary["companies"]) == (0, PEOPLE, 4)


def test_pretraining_lowers_validation_loss_and_the_fact_score_is_recomputed(run, world):
    out, report, summary = run
    log = records(out / "pretrain" / "metrics.jsonl")
    val = [r for r in log if "val_loss" in r]
    last_val = val[-1]
    assert f"| {last_val['step']} |" in report and f"{last_val['val_loss']:.3f}" in report
    assert summary["pretraining"]["val_loss"] == {"first": val[0]["val_loss"], "last": last_val["val_loss"]}
    assert last_val["val_loss"] < val[0]["val_loss"] - 2.0  # the stage exists to lower it (measured: 6.53 -> 2.37)
    assert (out / "pretrain" / "loss.png").stat().st_size > 1000
    assert (out / "pretrain" / "model" / "model.safetensors").is_file()

    right = re.search(r"Overall \*\*(\d+)%\*\* right", report)
    assert right and 0 <= int(right[1]) <= 100
    # Recomputed: the same probes completed greedily by the pretrained model, loaded afresh.
    probes = fact_probes(world)
    random.Random(0).shuffle(probes)
    probes = probes[:PROBES]
    session = Session.load(out / "pretrain" / "model")
    params = SamplingParams(max_new_tokens=12, temperature=0,
                            stop_token_ids=stop_token_ids(session.model.config, session.tokenizer))
    completions = complete(session.engine, session.tokenizer,
                           [[session.tokenizer.eos_id] + session.encode(p.prompt) for p in probes], params, stop=["."])
    share = sum(c.text.strip().startswith(p.answer) for p, c in zip(probes, completions)) / len(probes)
    facts = summary["pretraining"]["facts"]
    assert facts["probes"] == len(probes) and facts["right"] == pytest.approx(share)
    assert int(right[1]) == round(100 * share)


def test_instruction_tuning_lowers_loss_and_its_exact_match_is_recomputed(run, world, monkeypatch, capsys):
    out, report, summary = run
    log = records(out / "sft" / "metrics.jsonl")
    losses = [r["loss"] for r in log if "loss" in r]
    assert f"train loss {losses[0]:.2f} → {losses[-1]:.2f}" in report
    assert summary["finetuning"]["train_loss"] == {"first": losses[0], "last": losses[-1]}
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert f"validation loss {val[-1]:.2f}" in report
    assert summary["finetuning"]["val_loss"] == {"first": val[0], "last": val[-1]}
    assert val[-1] < val[0] - 0.15  # the stage exists to fit the chats (measured: 3.68 -> 3.37 in 6 steps)
    assert (out / "sft" / "adapter" / "adapter_config.json").is_file()

    # Held-out exact match, recomputed one question at a time with the adapter loaded afresh.
    heldout = questions(world, "heldout", seed=0)
    session = Session.load(out / "sft" / "adapter")
    params = SamplingParams(max_new_tokens=16, temperature=0,
                            stop_token_ids=stop_token_ids(session.model.config, session.tokenizer))
    right = sum(complete(session.engine, session.tokenizer, [session.chat_prompt(
        [{"role": "user", "content": q.question}])], params)[0].text.strip() == q.answer for q in heldout)
    reported = re.search(r"\| \*\*held-out people\*\* \((\d+)\) \| (\d+)% \| \*\*(\d+)%\*\* \|", report)
    assert reported and int(reported[1]) == len(heldout)
    assert int(reported[3]) == round(100 * right / len(heldout))
    em = summary["finetuning"]["exact_match"]
    assert em["heldout_people"]["sft"] == pytest.approx(right / len(heldout))
    assert int(reported[2]) == round(100 * em["heldout_people"]["pretrained"])
    assert (f"On them, exact match {change(em['heldout_people']['pretrained'], em['heldout_people']['sft'])}; on the "
            f"training people it {change(em['training_people']['pretrained'], em['training_people']['sft'])}.") in report

    # `lmforge chat` with the tuned model answers as the same model does greedily, turn by turn.
    chat, expected = [], []
    for q in heldout[:2]:
        chat.append({"role": "user", "content": q.question})
        reply = complete(session.engine, session.tokenizer, [session.chat_prompt(chat)], params)[0].text.strip()
        chat.append({"role": "assistant", "content": reply})
        expected.append(reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{q.question}\n" for q in heldout[:2]) + "/exit\n"))
    capsys.readouterr()
    assert main(["chat", "--checkpoint", str(out / "sft" / "adapter"), "--temperature", "0",
                 "--max-new-tokens", "16"]) == 0
    assert [line.strip() for line in capsys.readouterr().out.strip().splitlines()] == expected


def test_prompting_rows_state_the_summary_figures(run):
    _, report, summary = run
    assert len(summary["prompting"]) == 3
    for key, scores in summary["prompting"].items():
        task, model, metric = key.split(" / ")
        assert f"| {task} | {model} | {metric} | " + " | ".join(f"{v:.2f}" for v in scores.values()) + " |" in report
        assert all(0 <= v <= 1 for v in scores.values())


def test_alignment_figures_come_from_the_runs_and_the_conclusions_from_the_figures(run, world):
    out, report, summary = run
    alignment = summary["alignment"]
    # The reported preference accuracies are the DPO run's own validation records.
    dpo = records(out / "dpo" / "metrics.jsonl")
    last = [r for r in dpo if "val_preference_accuracy" in r][-1]
    assert (f"held-out preference accuracy {last['val_reference_preference_accuracy']:.0%} (SFT) → "
            f"**{last['val_preference_accuracy']:.0%}**") in report
    assert alignment["dpo_preference_accuracy"] == {"sft": last["val_reference_preference_accuracy"],
                                                    "dpo": last["val_preference_accuracy"]}
    for kind in ("helpful", "safety"):
        assert (out / f"reward-{kind}" / "model" / "config.json").is_file()
        val = [r for r in records(out / f"reward-{kind}" / "metrics.jsonl") if "val_accuracy" in r][-1]
        assert alignment["reward_model_accuracy"][kind] == val["val_accuracy"]
        assert f"**{val['val_accuracy']:.0%}** ({'helpfulness' if kind == 'helpful' else 'safety'})" in report
    # The reward models rank held-out pairs better than chance (measured: 79% helpful, 100% safety), and
    # DPO lowers its held-out loss (measured: 0.693 -> 0.687 in 4 steps on the annotators' flaws' pairs; the
    # easier wrong-value/evasive pairs fell 0.690 -> 0.660).
    assert alignment["reward_model_accuracy"]["helpful"] >= 0.6 and alignment["reward_model_accuracy"]["safety"] >= 0.75
    dpo_val = [r["val_loss"] for r in dpo if "val_loss" in r]
    assert dpo_val[-1] < dpo_val[0] - 0.003
    ppo = records(out / "ppo" / "metrics.jsonl")
    assert alignment["ppo"]["reward"] == {"first": ppo[0]["reward"], "last": ppo[-1]["reward"]}
    assert f"training reward {ppo[0]['reward']:.2f} → {ppo[-1]['reward']:.2f}" in report

    pairs = records(out / "world" / "preferences-heldout.jsonl")
    for flaw, (_, description, learnable) in FLAWS.items():
        description += "" if learnable else " (needs the fact)"
        if n := sum(p["flaw"] == flaw for p in pairs):
            assert re.search(rf"\| {re.escape(description)} \| {n} \| \d+% \| \d+% \|", report)
            shares = alignment["flaws"][flaw]
            assert shares["pairs"] == n
            assert f"| {description} | {n} | {shares['reward_model']:.0%} | {shares['sft_likelihood']:.0%} |" in report
    assert learnable_conclusion(alignment["flaws"]) in report
    rounds = records(out / "rejection" / "rounds.jsonl")
    assert alignment["rejection_sampling"] == {k: rounds[-1][k] for k in ("samples", "mean_best_score", "mean_score",
                                                                           "selection_gain")}
    assert rounds[-1]["mean_best_score"] >= rounds[-1]["mean_score"]  # the best of K is at least the mean
    assert (out / "rejection" / "round-1" / "sft" / "adapter" / "adapter_config.json").is_file()
    rpo = [r for r in records(out / "dpo-rpo" / "metrics.jsonl") if "val_preference_accuracy" in r][-1]
    assert alignment["rpo_preference_accuracy"] == {"sft": rpo["val_reference_preference_accuracy"],
                                                    "dpo": rpo["val_preference_accuracy"]}
    assert "val_nll_loss" in rpo  # the fixed DPO logs its NLL term
    for name in ("SFT + DPO", "SFT + DPO + RPO"):
        number = r"-?\d+\.\d\d"
        row = rf"\| {re.escape(name)} \| {number} \| {number} \| {number} \| \d+% \| \d+% \| \d+% \|"
        assert re.search(row, report)
    for name, m in alignment["models"].items():
        assert (f"| {name} | {m['mean_reward_greedy']:.2f} | {m['mean_reward_sampled']:.2f} | {m['kl_to_sft']:.2f} | "
                f"{m['held_out_em']:.0%} | {m['refusal_rate']:.0%} | {m['false_refusal_rate']:.0%} |") in report
    trained, redrawn = ({json.dumps([r["prompt"], r["rejected"]]) for r in records(path)}
                        for path in (out / "world" / "preferences-every-flaw.jsonl",
                                     out / "world" / "preferences-redrawn.jsonl"))
    assert redrawn and not trained & redrawn
    assert re.search(r"ranks \d+% of its training pairs' wrong values lower, \d+% of new pairs drawn", report)
    assert (out / "ppo" / "adapter" / "adapter_config.json").is_file() and (out / "ppo" / "report.md").is_file()
    # The conclusions are the ones the figures give.
    assert reward_model_conclusion(alignment["wrong_value_ranked_lower"]) in report
    assert policy_conclusion(alignment["models"], alignment["reward_gains"]) in report
    assert prompted_conclusion(alignment["reward_gains"], alignment["prompted_reward_gains"]) in report
    assert naming_conclusion(alignment["models"], alignment["flaws"]["wrong_person"]["reward_model"]) in report
    # The RLHF prompts ask about every other held-out person, never with an answer; no prompt names the others.
    heldout = sorted(p.name for p in world.pretraining_people() if p.split == "heldout")
    assert alignment["prompted_people"] == heldout[::2] and len(heldout) >= 2
    prompts = [r["prompt"] for r in records(out / "world" / "ppo-prompts.jsonl")]
    for name in heldout:
        asked = [q for q in prompts if name in q]
        assert bool(asked) == (name in alignment["prompted_people"])
    assert not {q.answer for q in questions(world, "heldout", phrasings=3)} & set(prompts)
    for name, m in alignment["models"].items():
        p = m["prompted_people"]
        for group in (m, p):  # an exact answer names the person asked, so the two shares cannot overlap
            assert 0 <= group["another_person_rate"] <= 1 - group["held_out_em"] + 1e-9
        assert (f"| {m['false_refusal_rate']:.0%} | {p['mean_reward_greedy']:.2f} | {p['mean_reward_sampled']:.2f} | "
                f"{p['held_out_em']:.0%} |") in report
    goals = alignment_goals(alignment, PPO_TARGET_KL)
    assert goals_table(goals) in report and alignment["goals"] == [g._asdict() for g in goals]
    assert "it has learnt the pairs it was shown, not the facts behind them" not in report


def test_retrieval_store_and_figures(run, world):
    out, report, summary = run
    retrieval = summary["retrieval"]
    # The store holds the world's documents; the summary restates the retrieval table's figures.
    with Store.open(out / "store") as store:
        assert store.documents() == sorted(d["id"] for d in context_documents(world))
        assert (retrieval["documents"], retrieval["chunks"]) == (len(store.documents()), len(store))
    closed, grounded = re.search(r"\| \*\*all\*\* \(\d+\) \| (\d+)% \| \*\*(\d+)%\*\* \|", report).groups()
    assert re.search(rf"\| SFT \+ retrieval tuning \| \d+% \| {closed}% \| {grounded}% \|", report)
    assert (int(closed), int(grounded)) == (round(100 * retrieval["closed_book_em"]),
                                            round(100 * retrieval["grounded_em"]))
    assert "Final Answer:" in report or "Observation:" in report
    for mode in ("dense", "bm25", "hybrid"):
        assert f"| {mode} | {retrieval['recall'][f'{mode}@1']:.0%} | {retrieval['recall'][f'{mode}@5']:.0%} |" in report
    # The store exists to find the fact a question needs: its gold document is usually among the first five
    # (measured: 100% dense and hybrid).
    assert retrieval["recall"]["hybrid@5"] >= 0.8 and retrieval["recall"]["dense@5"] >= 0.6


def test_summary_json_and_the_summary_table_agree(run):
    _, report, summary = run
    models = summary["summary"]
    assert list(models) == ["pretrained", "SFT", "SFT + rejection sampling", "SFT + DPO", "SFT + DPO + RPO",
                            "SFT + PPO", "SFT + retrieval tuning"]
    for name, m in models.items():
        assert set(m) >= {"held_out_em", "unseen_closed_book_em", "unseen_retrieval_em", "refusal_rate",
                          "false_refusal_rate", "mean_reward_greedy", "mean_reward_sampled", "kl_to_sft"}
        assert (f"| {name} | {m['held_out_em']:.0%} | {m['unseen_closed_book_em']:.0%} | "
                f"{m['unseen_retrieval_em']:.0%} | {m['refusal_rate']:.0%} | {m['false_refusal_rate']:.0%} | "
                f"{m['mean_reward_greedy']:.2f} | {m['mean_reward_sampled']:.2f} | {m['kl_to_sft']:.2f} |") in report
    for name in ("SFT", "SFT + rejection sampling", "SFT + DPO", "SFT + DPO + RPO", "SFT + PPO"):
        assert {k: models[name][k] for k in summary["alignment"]["models"][name]} == \
            summary["alignment"]["models"][name]
    assert models["SFT + retrieval tuning"]["unseen_retrieval_em"] == summary["retrieval"]["grounded_em"]
    assert models["SFT"]["kl_to_sft"] == 0.0  # the SFT model's own replies, scored by itself
    # SFT's safety demonstrations are what the refusals come from: the pretrained model refuses less.
    assert models["pretrained"]["refusal_rate"] <= models["SFT"]["refusal_rate"]


def test_holistic_table_and_conclusions_come_from_the_figures(run, world):
    out, report, summary = run
    figures = summary["holistic"]
    assert list(figures) == ["pretrained", "SFT", DONT_KNOW_MODEL, "SFT + DPO + RPO",
                             "SFT + retrieval tuning, with retrieval"]
    for name, f in figures.items():
        assert holistic_row(name, f) in report
        known, unseen = f["held_out"], f["never_seen"]
        assert set(known) == {"accuracy", "calibration", "selective", "robustness", "fairness", "toxicity",
                              "efficiency"}
        assert 0 <= known["calibration"]["ece"] <= 1 and sum(b["count"] for b in known["calibration"]["bins"]) == \
            len(questions(world, "heldout"))
        assert unseen["selective"]["confident_wrong_rate"] <= 1 - unseen["accuracy"]["exact_match"] + 1e-9
    for line in conclusions(figures):
        assert line in report
    ece = {n: f["held_out"]["calibration"]["ece"] for n, f in figures.items()}
    if list(ece.values()).count(min(ece.values())) == 1:
        assert f"- {min(ece, key=ece.get)} is the best calibrated on the held-out people" in report
    wrong = {n: f["never_seen"]["selective"]["confident_wrong_rate"] for n, f in figures.items()}
    tied = [n for n, w in wrong.items() if w == min(wrong.values())]
    named = tied[0] if len(tied) == 1 else ", ".join(tied[:-1]) + " and " + tied[-1]
    assert f"- {named} give" in report and f"wrong answers about the people left out of pretraining: " \
        f"{min(wrong.values()):.0%}" in report
    for png in (HOLISTIC_RELIABILITY_PNG, HOLISTIC_COVERAGE_PNG):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in report
    # The "I don't know" option's data: questions about people outside the world, declined.
    declined = records(out / "world" / "dont-know-sft.jsonl")
    names = {p.name for p in world.people}
    for record in declined:
        question, reply = (m["content"] for m in record["messages"])
        who = reply.removeprefix("I don't know who ").removesuffix(" is.")
        assert who in question and who not in names
    assert (out / "sft-dont-know" / "adapter" / "adapter_model.safetensors").exists()
    assert set(summary["seconds"]) == {"pretraining", "finetuning", "prompting", "alignment", "retrieval", "holistic",
                                       "seq2seq", "summary"}


def test_t5_stage_pretrains_tunes_and_its_scores_are_recomputed(run, world):
    out, report, summary = run
    figures = summary["seq2seq"]
    pretraining = [r["val_loss"] for r in records(out / "t5" / "pretrain" / "metrics.jsonl") if "val_loss" in r]
    assert figures["pretraining_val_loss"] == {"first": pretraining[0], "last": pretraining[-1]}
    assert pretraining[-1] < pretraining[0]  # span corruption is learnt (8 steps: the sentinels and </s>)
    transformers = pytest.importorskip("transformers")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out / "t5" / "pretrain" / "model")
    assert figures["parameters"] == sum(p.numel() for p in hf.parameters())
    models = figures["models"]
    assert list(models) == ["pretrained (span corruption)", "full fine-tuning", "LoRA"]
    assert models["full fine-tuning"]["trainable_parameters"] == figures["parameters"]
    adapter = load_file(out / "t5" / "lora" / "adapter" / "adapter_model.safetensors")
    assert models["LoRA"]["trainable_parameters"] == sum(t.numel() for t in adapter.values())
    for name, m in models.items():
        row = (f"| {name} | {m['trainable_parameters']:,} | {m['seconds']:.0f} s | {m['summarize']['rouge1']:.2f} | "
               f"{m['summarize']['rouge2']:.2f} | {m['summarize']['rougeL']:.2f} | "
               f"{m['summarize']['exact_match']:.0%} | "
               f"{m['qa']['exact_match']:.0%} | {m['qa']['rougeL']:.2f} |")
        assert row in report
    # Recomputed: the LoRA model's greedy summaries of the held-out biographies, scored with rouge-score.
    from rouge_score.rouge_scorer import RougeScorer
    from lmforge.world.seq2seq import summarization_pairs
    session = Session.load(out / "t5" / "lora" / "adapter")
    pairs = summarization_pairs(world, "heldout")
    outputs = session.engine.generate([session.encode(p.input) for p in pairs], session.greedy(48))
    texts = [session.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
    scorer = RougeScorer(["rougeL"])
    rouge_l = sum(scorer.score(p.target, t)["rougeL"].fmeasure for p, t in zip(pairs, texts)) / len(pairs)
    assert models["LoRA"]["summarize"]["rougeL"] == pytest.approx(rouge_l, abs=1e-9)
