"""The demo's encoder-decoder stage, the course notes' FLAN-T5 recipe at the world's size: a small T5
pretrained with span corruption on the world's biographies, then instruction-tuned on a two-task mixture
(summarize a biography into one line; answer a question given the biography), fully and with LoRA;
ROUGE and exact match on held-out people before tuning and after each, with trainable parameters and time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from lmforge.data.seq2seq import Seq2SeqDatasetSpec, Seq2SeqDataConfig
from lmforge.demo.common import score_change
from lmforge.eval.runner import evaluate
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.peft.method import AdapterConfig
from lmforge.tokenizer import train_t5_tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.pretrain import DataConfig, ModelSpec, PretrainConfig, pretrain
from lmforge.train.run_dir import RunDir, table_cell
from lmforge.train.sft import SFTConfig, sft
from lmforge.world.people import Person, World
from lmforge.world.seq2seq import summarization_pairs, write_seq2seq_data
from lmforge.world.tasks import world_task

T5_MODEL = dict(hidden_size=128, head_dim=32, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                dropout_rate=0.0)
VOCAB, SENTINELS, INPUT_TOKENS = 1000, 20, 64  # tokenizer; span-corruption inputs
SOURCE_TOKENS, TARGET_TOKENS = 320, 48  # tuning pairs (the biographies are 150-300 tokens)
BIOGRAPHIES = 6  # differently worded biographies of each training person to summarize
TASKS = {"summarize": "world-summarize-heldout", "qa": "world-qa-context-heldout"}
METHODS = {  # name: (adapter, learning rate)
    "full fine-tuning": (AdapterConfig(method="full"), 3e-3),
    "LoRA": (AdapterConfig(method="lora", r=16, alpha=32, dropout=0.0, targets="all-linear"), 3e-3),
}


@dataclass
class Seq2Seq:
    section: str
    figures: dict[str, Any]  # for summary.json


def pretrain_t5(out: Path, corpus: Path, steps: int, seed: int) -> tuple[Path, float]:
    """A T5 tokenizer and span-corruption pretraining on the corpus; the model directory and seconds."""
    train_t5_tokenizer([corpus], VOCAB, out / "tokenizer", extra_ids=SENTINELS)
    config = PretrainConfig(
        out_dir=out / "pretrain", model=ModelSpec(preset="t5-small", overrides=T5_MODEL),
        data=DataConfig(paths=[corpus], tokenizer=out / "tokenizer", seq_len=INPUT_TOKENS, val_fraction=0.05),
        train=TrainConfig(steps=steps, micro_batch_size=16, lr=3e-3, warmup_steps=20, weight_decay=0.0, log_every=10,
                          eval_every=max(1, steps // 4), save_every=steps, seed=seed))
    start = time.perf_counter()
    model = pretrain(config)
    return model, time.perf_counter() - start


def tune(out: Path, base: Path, data: dict[str, Path], method: str, steps: int, seed: int) -> tuple[Path, float]:
    """Instruction tuning on the mixture with one of `METHODS`; the model (or adapter) and seconds."""
    adapter, lr = METHODS[method]
    config = SFTConfig(
        out_dir=out / method.split()[0].lower(), base=base,
        data=Seq2SeqDataConfig(datasets=[Seq2SeqDatasetSpec(path=path) for path in data.values()],
                               max_source_len=SOURCE_TOKENS,
                               max_target_len=TARGET_TOKENS, val_fraction=0.05),
        adapter=adapter.model_copy(update={"seed": seed}),
        train=TrainConfig(steps=steps, micro_batch_size=16, lr=lr, warmup_steps=10, weight_decay=0.0, log_every=10,
                          eval_every=max(1, steps // 2), save_every=steps, seed=seed))
    start = time.perf_counter()
    tuned = sft(config)
    return tuned, time.perf_counter() - start


def summary_fields(person: Person) -> dict[str, str]:
    """The facts a one-line summary states (`world.seq2seq.summary`)."""
    return {"name": person.name, "birth year": str(person.birth_date.year), "birth city": person.birth_city,
            "employer": person.employer, "job title": person.job_title}


def scores(session: Session, world: World, seed: int) -> dict[str, dict[str, Any]]:
    """ROUGE-1/2/L and exact match of greedy outputs on each held-out task, with a few samples; for the
    summaries, also the share that state each of the person's facts."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=TARGET_TOKENS)
    found = {}
    for task, name in TASKS.items():
        result = evaluate(session, world_task(name, seed=world.seed, people=len(world.people)), seed=seed,
                          sampling=greedy, progress=False)
        found[task] = {**{k: result["metrics"][k] for k in ("rouge1", "rouge2", "rougeL", "exact_match")},
                       "samples": [(s["input"], s["prediction"], s["answer"]) for s in result["samples"][:3]]}
        if task == "summarize":
            people = [world.person(pair.person) for pair in summarization_pairs(world, "heldout")]
            stated = [summary_fields(p) for p in people]
            found[task]["facts_stated"] = {
                field: sum(facts[field] in s["prediction"] for facts, s in zip(stated, result["samples"])) / len(people)
                for field in stated[0]}
    return found


def seq2seq_stage(out: Path, world: World, corpus: Path, seed: int, steps: int, tune_steps: int) -> Seq2Seq:
    """Pretrain a T5 for `steps`, tune it fully and with LoRA for `tune_steps`, and compare on held-out people."""
    out = out / "t5"
    data = write_seq2seq_data(world, out / "data", "train", biographies=BIOGRAPHIES, seed=seed)
    pretrained, pretrain_seconds = pretrain_t5(out, corpus, steps, seed)
    base = Session.load(pretrained)
    total = base.model.num_parameters()
    rows = {"pretrained (span corruption)": (scores(base, world, seed), total, pretrain_seconds)}
    for method in METHODS:
        tuned, seconds = tune(out, pretrained, data, method, tune_steps, seed)
        session = Session.load(tuned)
        trainable = total if METHODS[method][0].method == "full" else \
            sum(t.numel() for t in load_file(tuned / "adapter_model.safetensors").values())
        rows[method] = (scores(session, world, seed), trainable, seconds)
    pretraining = [r for r in RunDir(out / "pretrain").records() if "val_loss" in r]
    tuning = {"examples": {task: sum(1 for _ in path.open()) for task, path in data.items()},
              "steps": tune_steps, "vocabulary": base.tokenizer.vocab_size}
    return Seq2Seq(*section(rows, total, steps, pretraining, tuning))


def section(rows: dict[str, tuple[dict[str, Any], int, float]], total: int, steps: int,
            pretraining: list[dict[str, Any]], tuning: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The stage's report section (every outcome sentence computed from the scores) and its figures."""
    (before_name, (before, _, _)), *tuned = rows.items()
    full_name, (full, _, _) = tuned[0]
    lora_name, (lora, lora_trainable, _) = tuned[1]
    lora_config = METHODS[lora_name][0]
    targets = "every linear layer" if lora_config.targets == "all-linear" else \
        " and ".join(f"`{t}`" for t in lora_config.targets)
    gain = full["summarize"]["rougeL"] - before["summarize"]["rougeL"]
    kept = (lora["summarize"]["rougeL"] - before["summarize"]["rougeL"]) / gain if gain > 0 else float("nan")
    lines = [
        "## Encoder-decoder: T5 instruction-tuned on summaries and questions\n",
        f"The course notes' FLAN-T5 recipe at the world's size: a T5 (v1.0 layout, {total:,} parameters, a Unigram "
        f"tokenizer of {tuning['vocabulary']:,} tokens, {SENTINELS} of them sentinels, trained on the corpus) "
        "pretrained with span corruption (15% of the tokens "
        f"in spans of 3 on average, {INPUT_TOKENS}-token inputs) on the biographies for {steps} steps (validation loss "
        f"{pretraining[0]['val_loss']:.2f} → {pretraining[-1]['val_loss']:.2f}); then instruction-tuned for "
        f"{tuning['steps']} steps on a mixture with T5's task prefixes: `summarize: <biography>` → a one-line "
        f"summary ({tuning['examples']['summarize']} pairs) and `question: … context: <biography>` → the bare value "
        f"({tuning['examples']['qa']} pairs), about the training people only. Scored by greedy decoding on the "
        "*held-out* people's freshly worded biographies.\n",
        f"Full fine-tuning's summary ROUGE-L {score_change(before['summarize']['rougeL'], full['summarize']['rougeL'])}"
        f"; LoRA (rank {lora_config.r} on {targets}: {lora_trainable:,} parameters, "
        f"{lora_trainable / total:.1%} of the model) reached {lora['summarize']['rougeL']:.2f}"
        + (f", {kept:.0%} of full fine-tuning's gain" if gain > 0 and kept > 0 else
           ", no gain over the pretrained model" if lora["summarize"]["rougeL"] <= before["summarize"]["rougeL"] else "")
        + f". Question answering's exact match went from {before['qa']['exact_match']:.0%} to "
        f"{full['qa']['exact_match']:.0%} (full) and {lora['qa']['exact_match']:.0%} (LoRA).\n",
        "| model | trainable parameters | time | summary ROUGE-1 | ROUGE-2 | ROUGE-L | exact match | QA exact match | "
        "QA ROUGE-L |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (found, trainable, seconds) in rows.items():
        summ, qa = found["summarize"], found["qa"]
        lines.append(f"| {name} | {trainable:,} | {seconds:.0f} s | {summ['rouge1']:.2f} | {summ['rouge2']:.2f} | "
                     f"{summ['rougeL']:.2f} | {summ['exact_match']:.0%} | {qa['exact_match']:.0%} | "
                     f"{qa['rougeL']:.2f} |")
    stated = {name: found["summarize"]["facts_stated"] for name, (found, _, _) in rows.items()}
    ranked = sorted(stated[full_name].items(), key=lambda item: -item[1])
    lines += ["", "ROUGE rewards the summary's form as much as its facts. Which of the person's facts the held-out "
              "summaries state (after full fine-tuning: " + ", ".join(f"{field} {share:.0%}" for field, share in ranked)
              + "):\n", f"| fact | {before_name} | {full_name} | {lora_name} |", "|---|---:|---:|---:|"]
    lines += [f"| {field} | " + " | ".join(f"{stated[name][field]:.0%}" for name in rows) + " |" for field, _ in ranked]
    lines += ["", f"| held-out input | {before_name} | {full_name} | {lora_name} | reference |",
              "|---|---|---|---|---|"]
    for task in TASKS:
        for i, (text, answer, reference) in enumerate(before[task]["samples"][:2]):
            outputs = [found[task]["samples"][i][1] for found, _, _ in rows.values()]
            lines.append(f"| {table_cell(text, 60)} | " + " | ".join(table_cell(o, 50) for o in outputs)
                         + f" | {table_cell(reference, 50)} |")
    lines.append("\n![T5 span-corruption loss](t5/pretrain/loss.png)\n")
    print(f"[demo] T5: summary ROUGE-L {before['summarize']['rougeL']:.2f} -> {full['summarize']['rougeL']:.2f} "
          "(full), "
          f"{lora['summarize']['rougeL']:.2f} (LoRA)")
    figures = {"parameters": total, "pretraining_steps": steps, "tuning_steps": tuning["steps"],
               "pretraining_val_loss": {"first": pretraining[0]["val_loss"], "last": pretraining[-1]["val_loss"]},
               "models": {name: {"trainable_parameters": trainable, "seconds": seconds,
                                 **{task: {k: v for k, v in m.items() if k != "samples"} for task, m in found.items()}}
                          for name, (found, trainable, seconds) in rows.items()}}
    return "\n".join(lines), figures
