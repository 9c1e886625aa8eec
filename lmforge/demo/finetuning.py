"""The demo's instruction tuning: LoRA on questions about the training people (with safety
demonstrations mixed in), exact match before and after; then zero-, one- and few-shot prompting."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from lmforge.demo.common import change, greedy_chat_answers, mean
from lmforge.eval.runner import evaluate
from lmforge.io import read_jsonl
from lmforge.generate.session import Session
from lmforge.peft.method import AdapterConfig
from lmforge.tokenizer import IM_END, IM_START, Tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.run_dir import RunDir, table_cell
from lmforge.train.sft import DatasetSpec, SFTConfig, SFTDataConfig, sft
from lmforge.world.documents import DONT_KNOW, questions, unknown_questions, write_instruction_data, write_jsonl
from lmforge.world.people import World
from lmforge.world.safety import REFUSAL, write_safety_data
from lmforge.world.tasks import world_task

SAFETY_SHARE = 0.15  # weight of the safety demonstrations in the SFT mixture (the questions weigh 1)
DONT_KNOW_SHARE = 0.1  # weight of the "I don't know" demonstrations (the "I don't know" option)
SHOTS = (0, 1, 3)
PROMPTING_RUNS = (  # (model, task, chat, metric)
    ("pretrained", "world-mc", False, "acc"),
    ("pretrained", "world-qa-heldout", False, "f1"),
    ("instruction-tuned (chat)", "world-qa-heldout", True, "exact_match"),
)


@dataclass
class Finetuning:
    section: str
    figures: dict[str, Any]  # for summary.json
    adapter: Path


def unseen_tokens(tokenizer: Tokenizer, corpus: Path, replies: tuple[str, ...] = (REFUSAL,)) -> list[str | int]:
    """Tokens the SFT targets need that the pretraining `corpus` never holds, so their embedding and
    output rows are still random: the chat markers, and the word pieces of fixed `replies` (the refusal's
    words are not in the biographies). LoRA alone cannot make them likely; they train as PEFT's trainable
    tokens."""
    seen = {token for text in read_jsonl(corpus) for token in tokenizer.encode(text)}
    needed = {token for reply in replies for token in tokenizer.encode(reply)}
    return [IM_START, IM_END, *sorted(needed - seen)]


def train_sft(out: Path, world: World, model_dir: Path, tokenizer: Tokenizer, steps: int,
              seed: int, *, dont_know: int = 0) -> tuple[SFTConfig, Path, float]:
    """LoRA SFT on the training people's questions and the safety demonstrations; its adapter and seconds.
    With `dont_know` > 0, as many questions about people outside the world, answered "I don't know who
    ... is.", join the mixture (into `sft-dont-know`)."""
    data = write_instruction_data(world, out / "world" / "sft.jsonl", "train", phrasings=2, seed=seed)
    safety = write_safety_data(world, out / "world" / "safety-sft.jsonl", "train")
    datasets = [DatasetSpec(path=data), DatasetSpec(path=safety, weight=SAFETY_SHARE)]
    replies: tuple[str, ...] = (REFUSAL,)
    if dont_know:
        unknown = write_jsonl(out / "world" / "dont-know-sft.jsonl",
                              ({"messages": q.messages()} for q in unknown_questions(world, dont_know, seed=seed)))
        datasets.append(DatasetSpec(path=unknown, weight=DONT_KNOW_SHARE))
        replies += (DONT_KNOW.format(who=""),)
    config = SFTConfig(
        out_dir=out / ("sft-dont-know" if dont_know else "sft"), base=model_dir,
        data=SFTDataConfig(datasets=datasets, max_len=96, val_fraction=0.05),
        adapter=AdapterConfig(method="lora", r=16, alpha=32, targets="all-linear",
                              trainable_tokens=unseen_tokens(tokenizer, out / "world" / "corpus.jsonl", replies),
                              seed=seed),
        train=TrainConfig(steps=steps, micro_batch_size=16, lr=3e-3, warmup_steps=10, weight_decay=0.0,
                          log_every=10, eval_every=max(1, steps // 3), save_every=steps, seed=seed),
    )
    start = time.perf_counter()
    adapter = sft(config)
    return config, adapter, time.perf_counter() - start


def sft_stage(out: Path, world: World, model_dir: Path, base: Session, steps: int, seed: int) -> Finetuning:
    """LoRA instruction tuning on the training people's questions; exact match before and after."""
    config, adapter, seconds = train_sft(out, world, model_dir, base.tokenizer, steps, seed)
    tuned = Session.load(adapter)
    seen = questions(world, "train", seed=seed + 1)  # other phrasings than most of those trained on
    heldout = questions(world, "heldout", seed=seed)
    base_seen, tuned_seen = greedy_chat_answers(base, seen), greedy_chat_answers(tuned, seen)
    base_held, tuned_held = greedy_chat_answers(base, heldout), greedy_chat_answers(tuned, heldout)
    records = RunDir(config.out_dir).records()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    trainable = sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())
    lines = [
        "## Instruction tuning (LoRA)\n",
        "LoRA (rank 16 on every linear layer, plus the embedding and output rows of the tokens pretraining never "
        f"wrote: the chat markers `{IM_START}` and `{IM_END}` and {len(config.adapter.trainable_tokens) - 2} of the "
        f"refusal's word pieces, whose rows are still random and which LoRA alone leaves unlikely; {trainable:,} "
        "parameters, "
        f"{trainable / base.model.num_parameters():.1%} of the model) on {len(questions(world, 'train', phrasings=2))} "
        "question/answer chats about the *training* people, mixed with safety demonstrations (requests for a "
        "private phone number answered with a refusal, harmless look-alikes answered; "
        f"{SAFETY_SHARE / (1 + SAFETY_SHARE):.0%} of the examples), loss on the answers only: {steps} steps in "
        f"{seconds:.0f} s; "
        f"train loss {train[0]['loss']:.2f} → {train[-1]['loss']:.2f}, validation loss "
        f"{val[-1]['val_loss']:.2f}. The adapter is saved in PEFT's format at `sft/adapter`.\n",
        "Exact match of greedy answers to questions in the chat template. The held-out people were never in "
        "the fine-tuning data: answering about them means extracting what pretraining stored. On them, exact "
        f"match {change(mean(base_held), mean(tuned_held))}; on the training people it "
        f"{change(mean(base_seen), mean(tuned_seen))}.\n",
        "| questions about | pretrained model | after LoRA SFT |",
        "|---|---:|---:|",
        f"| training people ({len(seen)}) | {mean(base_seen):.0%} | {mean(tuned_seen):.0%} |",
        f"| **held-out people** ({len(heldout)}) | {mean(base_held):.0%} | **{mean(tuned_held):.0%}** |",
        "",
        "| held-out attribute | after LoRA SFT |",
        "|---|---:|",
    ]
    by_attribute: dict[str, list[bool]] = defaultdict(list)
    for q, (_, ok) in zip(heldout, tuned_held):
        by_attribute[q.attribute].append(ok)
    lines += [f"| {a} | {mean(oks):.0%} |" for a, oks in sorted(by_attribute.items())]
    lines += ["", "| question (held-out person) | pretrained | after SFT | true answer |", "|---|---|---|---|"]
    for q, (before, _), (after, ok) in list(zip(heldout, base_held, tuned_held))[:8]:
        lines.append(f"| {q.question} | {table_cell(before, 40)} | {table_cell(after, 40)} {'✓' if ok else '✗'} | "
                     f"{q.answer} |")
    lines.append("\n![SFT loss curve](sft/loss.png)\n")
    print(f"[demo] SFT: held-out exact match {mean(base_held):.0%} -> {mean(tuned_held):.0%} "
          f"({trainable:,} adapter parameters)")
    figures = {"trainable_parameters": trainable, "train_loss": {"first": train[0]["loss"], "last": train[-1]["loss"]},
               "val_loss": {"first": val[0]["val_loss"], "last": val[-1]["val_loss"]},
               "exact_match": {"training_people": {"pretrained": mean(base_seen), "sft": mean(tuned_seen)},
                               "heldout_people": {"pretrained": mean(base_held), "sft": mean(tuned_held)}}}
    return Finetuning("\n".join(lines), figures, adapter)


def prompting_section(base: Session, tuned: Session, seed: int, people: int,
                      limit: int = 150) -> tuple[str, dict[str, Any]]:
    """Zero-, one- and few-shot prompting of the pretrained and the instruction-tuned model on the
    world's multiple-choice facts (log-likelihood) and held-out questions (generation)."""
    rows, figures = [], {}
    for label, name, chat, metric in PROMPTING_RUNS:
        session = tuned if chat else base
        task = world_task(name, seed=seed, people=people)
        scores = [evaluate(session, task, shots=k, limit=limit, seed=seed, chat=chat, progress=False)["metrics"][metric]
                  for k in SHOTS]
        rows.append(f"| {name} | {label} | {metric} | " + " | ".join(f"{v:.2f}" for v in scores) + " |")
        figures[f"{name} / {label} / {metric}"] = dict(zip((f"{k}-shot" for k in SHOTS), scores))
    section = "\n".join([
        "## Prompting: zero, one and few shots\n",
        f"`lmforge eval` on the built-in tasks (first {limit} items); exemplars are drawn from each task's own "
        "pool (the training people's facts and questions), never the item itself. Multiple choice is scored by the "
        "log-likelihood of each choice; questions by greedy generation.\n",
        "| task | model | metric | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |",
        "|---|---|---|" + "---:|" * len(SHOTS),
        *rows,
    ]) + "\n"
    return section, figures
