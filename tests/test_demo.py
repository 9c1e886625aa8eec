"""`lmforge demo` at a tiny size: every stage runs and the report agrees with the run's own records."""

from __future__ import annotations

import io
import json
import re

from lmforge.cli import main
from lmforge.data.world import FLAWS, make_world, questions
from lmforge.data.world_store import context_documents
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete, stop_token_ids
from lmforge.rag.store import Store


def test_demo_report_matches_the_run(tmp_path, monkeypatch, capsys):
    """Journey 1: `lmforge demo`, then `lmforge chat` with its instruction-tuned model."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--people", "12", "--steps", "30", "--sft-steps", "6",
                 "--align-steps", "4"]) == 0
    report = (out / "report.md").read_text()
    for section in ("## The world", "## Tokenizer", "## Pretraining", "## What pretraining taught",
                    "## Instruction tuning", "## Prompting", "## Alignment", "## Retrieval", "## Summary",
                    "## Real sizes"):
        assert section in report
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in records if "val_loss" in r][-1]
    assert f"| {last_val['step']} |" in report and f"{last_val['val_loss']:.3f}" in report
    assert (out / "pretrain" / "loss.png").stat().st_size > 1000
    assert (out / "pretrain" / "model" / "model.safetensors").is_file()
    right = re.search(r"Overall \*\*(\d+)%\*\* right", report)
    assert right and 0 <= int(right[1]) <= 100
    assert "| llama2-7b | 6.74 B |" in report

    sft = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in sft if "loss" in r]
    assert f"train loss {losses[0]:.2f} → {losses[-1]:.2f}" in report
    assert (out / "sft" / "adapter" / "adapter_config.json").is_file()

    # Held-out exact match, recomputed one question at a time with the adapter loaded afresh.
    world = make_world(0, n_people=12, n_companies=4)
    heldout = questions(world, "heldout", seed=0)
    session = Session.load(out / "sft" / "adapter")
    params = SamplingParams(max_new_tokens=16, temperature=0,
                            stop_token_ids=stop_token_ids(session.model.config, session.tokenizer))
    right = sum(complete(session.engine, session.tokenizer, [session.chat_prompt(
        [{"role": "user", "content": q.question}])], params)[0].text.strip() == q.answer for q in heldout)
    reported = re.search(r"\| \*\*held-out people\*\* \((\d+)\) \| (\d+)% \| \*\*(\d+)%\*\* \|", report)
    assert reported and int(reported[1]) == len(heldout)
    assert int(reported[3]) == round(100 * right / len(heldout))

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

    # Alignment: the reported preference accuracies are the DPO run's own validation records.
    dpo = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in dpo if "val_preference_accuracy" in r][-1]
    assert (f"held-out preference accuracy {last['val_reference_preference_accuracy']:.0%} (SFT) → "
            f"**{last['val_preference_accuracy']:.0%}**") in report
    for kind in ("helpful", "safety"):
        assert (out / f"reward-{kind}" / "model" / "config.json").is_file()
    pairs = [json.loads(line) for line in (out / "world" / "preferences-heldout.jsonl").read_text().splitlines()]
    for flaw, (_, description) in FLAWS.items():
        if n := sum(p["flaw"] == flaw for p in pairs):
            assert re.search(rf"\| {re.escape(description)} \| {n} \| \d+% \| \d+% \|", report)
    assert re.search(r"\| SFT \+ DPO \| -?\d+\.\d\d \| \d+% \| \d+% \| \d+% \|", report)
    trained, redrawn = ({json.dumps([r["prompt"], r["rejected"]]) for r in map(json.loads, path.read_text().splitlines())}
                        for path in (out / "world" / "preferences.jsonl", out / "world" / "preferences-redrawn.jsonl"))
    assert redrawn and not trained & redrawn
    assert re.search(r"ranks \d+% of its training pairs' wrong values lower, \d+% of new pairs drawn", report)
    assert (out / "ppo" / "adapter" / "adapter_config.json").is_file() and (out / "ppo" / "report.md").is_file()

    # Retrieval: the store holds the world's documents; the summary restates the retrieval table's figures
    with Store.open(out / "store") as store:
        assert store.documents() == sorted(d["id"] for d in context_documents(world))
    closed, grounded = re.search(r"\| \*\*all\*\* \(\d+\) \| (\d+)% \| \*\*(\d+)%\*\* \|", report).groups()
    assert re.search(rf"\| SFT \+ retrieval tuning \| \d+% \| {closed}% \| {grounded}% \|", report)
    assert "Final Answer:" in report or "Observation:" in report
