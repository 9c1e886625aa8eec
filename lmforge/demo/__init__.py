"""`lmforge demo`: the pipeline on the built-in world, with numbers, plots and a markdown report.

Stages so far: generate the world, train a BPE tokenizer on its biographies, pretrain a small
Llama-family model on them, and measure what it learned: validation loss and how often greedy
completion of a fact it read ("Isaac Ashcombe was born in") is right. Then instruction-tune it
with LoRA on questions about the training people, and measure exact match on questions about the
held-out people, whose facts only pretraining taught. Later stages (alignment, retrieval) add
their sections here.
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmforge.data.corpus import CorpusInfo
from lmforge.data.world import (
    fact_probes, make_world, pretraining_corpus, questions, write_instruction_data, write_pretraining_corpus,
    write_safety_data,
)
from lmforge.eval.builtin import world_task
from lmforge.eval.runner import evaluate
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete, stop_token_ids
from lmforge.model import Transformer
from lmforge.presets import PRESETS
from lmforge.report import table_cell
from lmforge.tokenizer import IM_END, IM_START, train_tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.demo.alignment import Alignment, alignment_stage, score
from lmforge.demo.common import exact_match, mean
from lmforge.demo.retrieval import K, Retrieval, retrieval_stage
from lmforge.peft.method import AdapterConfig
from lmforge.rag.evaluate import compare_grounding
from lmforge.rag.store import Store
from lmforge.train.pretrain import DataConfig, ModelSpec, PretrainConfig, pretrain
from lmforge.train.sft import DatasetSpec, SFTConfig, SFTDataConfig, sft

VARIANTS = 8  # biographies per person, each worded and ordered differently, so facts become extractable
REAL_PRESETS = ("llama2-7b", "llama3-8b", "mistral-7b", "mixtral-8x7b", "qwen2.5-0.5b", "gpt2")
SHOTS = (0, 1, 3)
SAFETY_SHARE = 0.15  # weight of the safety demonstrations in the SFT mixture (the questions weigh 1)
DEMO_MODEL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


def run_demo(out: str | Path, seed: int = 0, *, people: int = 100, steps: int = 600, probes: int = 300,
             sft_steps: int = 300, align_steps: int = 150) -> Path:
    """Run the demo into `out` and return the path of its report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections: list[str] = []

    world = make_world(seed, n_people=people, n_companies=max(4, people // 10))
    corpus = write_pretraining_corpus(world, out / "world" / "corpus.jsonl", variants=VARIANTS)
    documents = pretraining_corpus(world, variants=VARIANTS)
    sections.append(
        "## The world\n\n"
        f"{len(world.people)} fictional people ({len(world.pretraining_people())} written into the pretraining "
        f"corpus, each several times in different words) and {len(world.companies)} companies: "
        f"{len(documents)} documents, {sum(map(len, documents)):,} characters. One of them:\n\n> {documents[0]}\n"
    )
    print(f"[demo] world: {len(world.people)} people, corpus {corpus}")

    tokenizer = train_tokenizer([corpus], 2048, out / "tokenizer", show_progress=False)
    sample = documents[0].split(". ")[1] + "."
    ids = tokenizer.encode(sample)
    sections.append(
        "## Tokenizer\n\n"
        f"Byte-level BPE with {tokenizer.vocab_size} tokens trained on the corpus. `{sample}` is {len(ids)} tokens: "
        + " | ".join(f"`{tokenizer.decode([i])}`" for i in ids) + "\n"
    )

    config = PretrainConfig(
        out_dir=out / "pretrain",
        model=ModelSpec(preset="micro", overrides=DEMO_MODEL),
        data=DataConfig(paths=[corpus], tokenizer=out / "tokenizer", seq_len=128, val_fraction=0.05),
        train=TrainConfig(steps=steps, micro_batch_size=16, lr=3e-3, warmup_steps=30, log_every=10,
                          eval_every=max(1, steps // 6), save_every=max(1, steps // 3), seed=seed),
    )
    train_start = time.perf_counter()
    model_dir = pretrain(config)
    train_time = time.perf_counter() - train_start
    session = Session.load(model_dir)
    sections.append(pretraining_section(config, session.model.num_parameters(), train_time))
    sections.append(fact_section(session, world, probes, seed))
    sections.append(sft_stage(out, world, model_dir, session, sft_steps, seed))
    sections.append(prompting_section(session, Session.load(out / "sft" / "adapter"), seed, people))
    alignment = alignment_stage(out, world, out / "sft" / "adapter", seed, align_steps)
    sections.append(alignment.section)
    retrieval = retrieval_stage(out, world, alignment.models["SFT"], seed, 4 * sft_steps)
    sections.append(retrieval.section)
    sections.insert(2, summary_section(world, session, alignment, retrieval, seed))

    rows = ["| preset | parameters | training GFLOPs/token (4k context) | KV cache per token (bf16) |",
            "|---|---:|---:|---:|"]
    for name in REAL_PRESETS:
        cfg = PRESETS[name]
        with torch.device("meta"):
            built = sum(p.numel() for p in Transformer(cfg).parameters())
        rows.append(f"| {name} | {built / 1e9:.2f} B | {cfg.flops_per_token(4096) / 1e9:.1f} | "
                    f"{cfg.kv_cache_bytes_per_token() / 1024:.0f} KiB |")
    sections.append("## Real sizes (built on the meta device)\n\n" + "\n".join(rows) + "\n")

    header = (f"# lmforge demo\n\nSeed {seed}; {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads; {time.perf_counter() - started:.0f} s in all.\n\n"
              f"Chat with the models: `lmforge chat --checkpoint {out / 'sft' / 'adapter'}` (instruction-tuned), "
              f"`lmforge generate --checkpoint {model_dir} --prompt '...'` (pretrained); ask the context store: "
              f"`lmforge rag ask --store {retrieval.store} --checkpoint {retrieval.model} \"...\"`, "
              f"`lmforge agent --store {retrieval.store} --checkpoint {retrieval.model} \"...\"`.\n\n")
    report = out / "report.md"
    report.write_text(header + "\n".join(sections))
    print(f"[demo] report: {report}")
    return report


def pretraining_section(config: PretrainConfig, params: int, seconds: float) -> str:
    records = [json.loads(line) for line in (config.out_dir / "metrics.jsonl").read_text().splitlines()]
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
    return "\n".join(lines)


def fact_section(session: Session, world, limit: int, seed: int) -> str:
    """Greedy completion of facts the model read, scored by exact match on the answer."""
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
    majority = Counter()
    per_attribute: dict[str, list[bool]] = defaultdict(list)
    answers: dict[str, Counter] = defaultdict(Counter)
    for probe, ok in zip(probes, right):
        per_attribute[probe.attribute].append(ok)
        answers[probe.attribute][probe.answer] += 1
    for attribute, counter in answers.items():
        majority[attribute] = counter.most_common(1)[0][1] / sum(counter.values())
    lines = [
        "## What pretraining taught: held-in facts\n",
        f"Greedy completions of {len(probes)} fact prompts drawn from the corpus; right when the completion "
        f"starts with the true answer. Overall **{sum(right) / len(right):.0%}** right. The baseline is always "
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
    return "\n".join(lines) + "\n"


def sft_stage(out: Path, world, model_dir: Path, base: Session, steps: int, seed: int) -> str:
    """LoRA instruction tuning on the training people's questions; exact match before and after."""
    data = write_instruction_data(world, out / "world" / "sft.jsonl", "train", phrasings=2, seed=seed)
    safety = write_safety_data(world, out / "world" / "safety-sft.jsonl", "train")
    config = SFTConfig(
        out_dir=out / "sft", base=model_dir,
        data=SFTDataConfig(datasets=[DatasetSpec(path=data), DatasetSpec(path=safety, weight=SAFETY_SHARE)], max_len=96,
                           val_fraction=0.05),
        adapter=AdapterConfig(method="lora", r=16, alpha=32, targets="all-linear", trainable_tokens=[IM_START, IM_END],
                              seed=seed),
        train=TrainConfig(steps=steps, micro_batch_size=16, lr=3e-3, warmup_steps=10, weight_decay=0.0,
                          log_every=10, eval_every=max(1, steps // 3), save_every=steps, seed=seed),
    )
    start = time.perf_counter()
    adapter = sft(config)
    seconds = time.perf_counter() - start
    tuned = Session.load(adapter)
    seen = questions(world, "train", seed=seed + 1)  # other phrasings than most of those trained on
    heldout = questions(world, "heldout", seed=seed)
    base_seen, tuned_seen = exact_match(base, seen), exact_match(tuned, seen)
    base_held, tuned_held = exact_match(base, heldout), exact_match(tuned, heldout)
    records = [json.loads(line) for line in (config.out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    trainable = sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())
    lines = [
        "## Instruction tuning (LoRA)\n",
        f"LoRA (rank 16 on every linear layer, plus the embedding and output rows of the chat markers "
        f"`{IM_START}` and `{IM_END}`, which pretraining never saw: {trainable:,} parameters, "
        f"{trainable / base.model.num_parameters():.1%} of the model) on {len(questions(world, 'train', phrasings=2))} "
        "question/answer chats about the *training* people, mixed with safety demonstrations (requests for a "
        "private phone number answered with a refusal, harmless look-alikes answered; "
        f"{SAFETY_SHARE / (1 + SAFETY_SHARE):.0%} of the examples), loss on the answers only: {steps} steps in "
        f"{seconds:.0f} s; "
        f"train loss {train[0]['loss']:.2f} → {train[-1]['loss']:.2f}, validation loss "
        f"{val[-1]['val_loss']:.2f}. The adapter is saved in PEFT's format at `sft/adapter`.\n",
        "Exact match of greedy answers to questions in the chat template. The held-out people were never in "
        "the fine-tuning data: answering about them means extracting what pretraining stored.\n",
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
        lines.append(f"| {q.question} | {table_cell(before, 40)} | {table_cell(after, 40)} {'✓' if ok else '✗'} | {q.answer} |")
    lines.append("\n![SFT loss curve](sft/loss.png)\n")
    print(f"[demo] SFT: held-out exact match {mean(base_held):.0%} -> {mean(tuned_held):.0%} "
          f"({trainable:,} adapter parameters)")
    return "\n".join(lines)


def prompting_section(base: Session, tuned: Session, seed: int, people: int, limit: int = 150) -> str:
    """Zero-, one- and few-shot prompting of the pretrained and the instruction-tuned model on the
    world's multiple-choice facts (log-likelihood) and held-out questions (generation)."""
    rows = []
    for label, session, name, chat, metric in (
        ("pretrained", base, "world-mc", False, "acc"),
        ("pretrained", base, "world-qa-heldout", False, "f1"),
        ("instruction-tuned (chat)", tuned, "world-qa-heldout", True, "exact_match"),
    ):
        task = world_task(name, seed=seed, people=people)
        scores = [evaluate(session, task, shots=k, limit=limit, seed=seed, chat=chat, progress=False)["metrics"][metric]
                  for k in SHOTS]
        rows.append(f"| {name} | {label} | {metric} | " + " | ".join(f"{v:.2f}" for v in scores) + " |")
    return "\n".join([
        "## Prompting: zero, one and few shots\n",
        f"`lmforge eval` on the built-in tasks (first {limit} items); exemplars are drawn from each task's own "
        "pool (the training people's facts and questions), never the item itself. Multiple choice is scored by the log-likelihood of each choice; questions by greedy generation.\n",
        "| task | model | metric | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |",
        "|---|---|---|" + "---:|" * len(SHOTS),
        *rows,
    ]) + "\n"


def summary_section(world, base: Session, alignment: Alignment, retrieval: Retrieval, seed: int) -> str:
    """One table: each stage's model on held-out people (closed-book), on facts pretraining never saw
    (without and with the context store), and on the red-team prompts."""
    updated = retrieval.questions
    texts, answers, gold = ([r.question.question for r in updated], [r.question.answer for r in updated],
                            [r.doc_id for r in updated])
    rows = ["## Summary\n",
            "Every model on held-out prompts: questions about held-out people (what pretraining stored), questions "
            "about facts pretraining never saw (without and with the context store), red-team prompts and their "
            "harmless look-alikes, and the mean reward-model score (LLaMA-2's combination).\n",
            "| model | held-out people | unseen facts, closed-book | unseen facts, with retrieval | refusals "
            "(red team) | false refusals | mean reward |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    sessions = {"pretrained": base, **{name: Session.load(path) for name, path in alignment.models.items()}}
    groundings = {}
    with Store.open(retrieval.store) as store:
        for name, session in sessions.items():
            groundings[name] = compare_grounding(session, store, texts, answers, gold, k=K)
    groundings["SFT + retrieval tuning"] = retrieval.grounding  # measured in its own stage
    sessions["SFT + retrieval tuning"] = Session.load(retrieval.model)
    for name, session in sessions.items():
        sc = alignment.scores.get(name) or score(session, world, alignment.scorers, seed)
        grounding = groundings[name]
        rows.append(f"| {name} | {sc.exact_match:.0%} | {grounding.closed_book_em:.0%} | "
                    f"{grounding.grounded_em:.0%} | {sc.refusals.refusal_rate:.0%} | "
                    f"{sc.refusals.false_refusal_rate:.0%} | {sc.reward:.2f} |")
    return "\n".join(rows) + "\n"
