"""The demo's first stages: the world and its corpus, a BPE tokenizer trained on it, a small
Llama-family model pretrained on it, and how often greedy completion of a fact it read is right."""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.corpus import CorpusInfo
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete, stop_token_ids
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.pretrain import DataConfig, ModelSpec, PretrainConfig, pretrain
from lmforge.train.run_dir import RunDir
from lmforge.world.documents import fact_probes, pretraining_corpus, write_pretraining_corpus
from lmforge.world.people import World

VARIANTS = 8  # biographies per person, each worded and ordered differently, so facts become extractable
DEMO_MODEL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


@dataclass
class Pretraining:
    sections: list[str]  # the world, the tokenizer, pretraining, the facts it taught
    figures: dict[str, Any]  # for summary.json
    model: Path
    session: Session
    corpus: Path  # the biographies, one JSONL record per document


def pretraining_stage(out: Path, world: World, seed: int, steps: int, probes: int) -> Pretraining:
    """Write the corpus, train the tokenizer, pretrain for `steps`, and probe `probes` facts."""
    corpus = write_pretraining_corpus(world, out / "world" / "corpus.jsonl", variants=VARIANTS)
    documents = pretraining_corpus(world, variants=VARIANTS)
    print(f"[demo] world: {len(world.people)} people, corpus {corpus}")
    tokenizer = train_tokenizer([corpus], 2048, out / "tokenizer", show_progress=False)
    config = PretrainConfig(
        out_dir=out / "pretrain",
        model=ModelSpec(preset="micro", overrides=DEMO_MODEL),
        data=DataConfig(paths=[corpus], tokenizer=out / "tokenizer", seq_len=128, val_fraction=0.05),
        train=TrainConfig(steps=steps, micro_batch_size=16, lr=3e-3, warmup_steps=30, log_every=10,
                          eval_every=max(1, steps // 6), save_every=max(1, steps // 3), seed=seed),
    )
    start = time.perf_counter()
    model = pretrain(config)
    seconds = time.perf_counter() - start
    session = Session.load(model)
    training, train_figures = pretraining_section(config, session.model.num_parameters(), seconds)
    facts, fact_figures = fact_section(session, world, probes, seed)
    sections = [world_section(world, documents), tokenizer_section(tokenizer, documents), training, facts]
    return Pretraining(sections, {**train_figures, "facts": fact_figures}, model, session, corpus)


def world_section(world: World, documents: list[str]) -> str:
    return (
        "## The world\n\n"
        f"{len(world.people)} fictional people ({len(world.pretraining_people())} written into the pretraining "
        f"corpus, each several times in different words) and {len(world.companies)} companies: "
        f"{len(documents)} documents, {sum(map(len, documents)):,} characters. One of them:\n\n> {documents[0]}\n"
    )


def tokenizer_section(tokenizer: Tokenizer, documents: list[str]) -> str:
    sample = documents[0].split(". ")[1] + "."
    ids = tokenizer.encode(sample)
    return (
        "## Tokenizer\n\n"
        f"Byte-level BPE with {tokenizer.vocab_size} tokens trained on the corpus. `{sample}` is {len(ids)} tokens: "
        + " | ".join(f"`{tokenizer.decode([i])}`" for i in ids) + "\n"
    )


def pretraining_section(config: PretrainConfig, params: int, seconds: float) -> tuple[str, dict[str, Any]]:
    """The run's size and speed, and its validation records; with the figures for summary.json."""
    records = RunDir(config.out_dir).records()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    train_tokens = CorpusInfo.load(config.out_dir / "data").num_tokens["train"]
    tokens = config.train.steps * config.train.micro_batch_size * config.train.grad_accum * config.data.seq_len
    mfu = sum(r.get("mfu", 0) for r in train[1:]) / max(1, len(train) - 1)
    lines = [
        "## Pretraining\n",
        f"{params:,} parameters ({DEMO_MODEL['num_hidden_layers']} layers, hidden {DEMO_MODEL['hidden_size']}, "
        f"grouped-query attention {DEMO_MODEL['num_attention_heads']}/{DEMO_MODEL['num_key_value_heads']} heads), "
        f"{config.train.steps} AdamW steps of {config.train.micro_batch_size} x {config.data.seq_len} tokens "
        f"({tokens:,} tokens, {tokens / train_tokens:.0f} passes over the {train_tokens:,}-token "
        f"training split) in {seconds:.0f} s "
        f"({tokens / seconds:,.0f} tokens/s, MFU {mfu:.0%}).\n",
        "| step | train loss | validation loss | validation perplexity |",
        "|---:|---:|---:|---:|",
    ]
    by_step = {r["step"]: r for r in train}
    for r in val:
        lines.append(f"| {r['step']} | {by_step.get(r['step'], {}).get('loss', float('nan')):.3f} | "
                     f"{r['val_loss']:.3f} | {r['val_ppl']:.2f} |")
    lines.append("\n![loss curve](pretrain/loss.png)\n")
    figures = {"parameters": params, "steps": config.train.steps, "tokens": tokens,
               "val_loss": {"first": val[0]["val_loss"], "last": val[-1]["val_loss"]}}
    return "\n".join(lines), figures


def fact_section(session: Session, world: World, limit: int, seed: int) -> tuple[str, dict[str, Any]]:
    """Greedy completion of facts the model read, scored by whether it starts with the answer."""
    probes = fact_probes(world)
    random.Random(seed).shuffle(probes)
    probes = probes[:limit]
    params = SamplingParams(max_new_tokens=12, temperature=0,
                            stop_token_ids=stop_token_ids(session.model.config, session.tokenizer))
    start_of_document = [session.tokenizer.eos_id]  # documents are separated by EOS in pretraining
    prompts = [start_of_document + session.encode(p.prompt) for p in probes]
    results = []
    for start in range(0, len(prompts), 32):
        results += complete(session.engine, session.tokenizer, prompts[start : start + 32], params, stop=["."])
    right = [r.text.strip().startswith(p.answer) for p, r in zip(probes, results)]
    per_attribute: dict[str, list[bool]] = defaultdict(list)
    answers: dict[str, Counter] = defaultdict(Counter)
    for probe, ok in zip(probes, right):
        per_attribute[probe.attribute].append(ok)
        answers[probe.attribute][probe.answer] += 1
    majority = {a: counter.most_common(1)[0][1] / sum(counter.values()) for a, counter in answers.items()}
    overall = sum(right) / len(right)
    lines = [
        "## What pretraining taught: held-in facts\n",
        f"Greedy completions of {len(probes)} fact prompts drawn from the corpus; right when the completion "
        f"starts with the true answer. Overall **{overall:.0%}** right. The baseline is always "
        "answering the most common value of that attribute.\n",
        "| attribute | right | most-common-answer baseline |",
        "|---|---:|---:|",
    ]
    for attribute, oks in sorted(per_attribute.items()):
        lines.append(f"| {attribute} | {sum(oks) / len(oks):.0%} | {majority[attribute]:.0%} |")
    lines += ["", "| prompt | completion | true answer |", "|---|---|---|"]
    for probe, result, ok in list(zip(probes, results, right))[:8]:
        mark = "✓" if ok else "✗"
        lines.append(f"| {probe.prompt} | {result.text.strip()} {mark} | {probe.answer} |")
    print(f"[demo] held-in facts: {sum(right)}/{len(right)} right")
    figures = {"probes": len(probes), "right": overall,
               "baseline": sum(majority[p.attribute] for p in probes) / len(probes)}
    return "\n".join(lines) + "\n", figures
