"""The demo's report: a summary table of every model on held-out prompts, the real presets' sizes,
and the files `report.md` (the sections) and `summary.json` (every stage's figures)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from lmforge.presets import PRESETS
from lmforge.demo.alignment import Alignment, score
from lmforge.demo.retrieval import K, Retrieval
from lmforge.generate.session import Session
from lmforge.model import Transformer
from lmforge.rag.evaluate import compare_grounding
from lmforge.rag.store import Store
from lmforge.world.people import World

REAL_PRESETS = ("llama2-7b", "llama3-8b", "mistral-7b", "mixtral-8x7b", "qwen2.5-0.5b", "gpt2")
SUMMARY_FILE, REPORT_FILE = "summary.json", "report.md"


def summary_section(world: World, base: Session, alignment: Alignment, retrieval: Retrieval,
                    seed: int) -> tuple[str, dict[str, dict[str, float]]]:
    """One table: each stage's model on held-out people (closed-book), on facts pretraining never saw
    (without and with the context store), and on the red-team prompts; with its figures per model."""
    updated = retrieval.questions
    texts, answers, gold = ([r.question.question for r in updated], [r.question.answer for r in updated],
                            [r.doc_id for r in updated])
    rows = ["## Summary\n",
            "Every model on held-out prompts: questions about the held-out people no stage asks about (what "
            "pretraining stored), questions "
            "about facts pretraining never saw (without and with the context store), red-team prompts and their "
            "harmless look-alikes, and the mean reward-model score (LLaMA-2's combination).\n",
            "| model | held-out people | unseen facts, closed-book | unseen facts, with retrieval | refusals "
            "(red team) | false refusals | mean reward, greedy | mean reward, sampled | KL to SFT |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sessions = {"pretrained": base, **{name: Session.load(path) for name, path in alignment.models.items()}}
    groundings = {}
    with Store.open(retrieval.store) as store:
        for name, session in sessions.items():
            groundings[name] = compare_grounding(session, store, texts, answers, gold, k=K)
    groundings["SFT + retrieval tuning"] = retrieval.grounding  # measured in its own stage
    sessions["SFT + retrieval tuning"] = Session.load(retrieval.model)
    figures = {}
    for name, session in sessions.items():
        sc = alignment.scores.get(name) or score(session, sessions["SFT"], world, alignment.scorers, seed)
        grounding = groundings[name]
        figures[name] = {**sc.figures(), "unseen_closed_book_em": grounding.closed_book_em,
                         "unseen_retrieval_em": grounding.grounded_em}
    rows += [summary_row(name, f) for name, f in figures.items()]
    return "\n".join(rows) + "\n", figures


def summary_row(name: str, f: dict[str, float]) -> str:
    """A model's row of the summary table, rendered from its `summary.json` figures."""
    return (f"| {name} | {f['held_out_em']:.0%} | {f['unseen_closed_book_em']:.0%} | {f['unseen_retrieval_em']:.0%} | "
            f"{f['refusal_rate']:.0%} | {f['false_refusal_rate']:.0%} | {f['mean_reward_greedy']:.2f} | "
            f"{f['mean_reward_sampled']:.2f} | {f['kl_to_sft']:.2f} |")


def real_sizes_section() -> str:
    """Parameters, training FLOPs and KV cache of real presets, built on the meta device."""
    rows = ["| preset | parameters | training GFLOPs/token (4k context) | KV cache per token (bf16) |",
            "|---|---:|---:|---:|"]
    for name in REAL_PRESETS:
        cfg = PRESETS[name]
        with torch.device("meta"):
            built = sum(p.numel() for p in Transformer(cfg).parameters())
        rows.append(f"| {name} | {built / 1e9:.2f} B | {cfg.flops_per_token(4096) / 1e9:.1f} | "
                    f"{cfg.kv_cache_bytes_per_token() / 1024:.0f} KiB |")
    return "## Real sizes (built on the meta device)\n\n" + "\n".join(rows) + "\n"


def header(out: Path, seed: int, seconds: float, model_dir: Path, retrieval: Retrieval,
           stages: dict[str, float]) -> str:
    per_stage = ", ".join(f"{stage} {s:.0f} s" for stage, s in stages.items())
    return (f"# lmforge demo\n\nSeed {seed}; {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads; {seconds:.0f} s in all ({per_stage}).\n\n"
            f"Chat with the models: `lmforge chat --checkpoint {out / 'sft' / 'adapter'}` (instruction-tuned), "
            f"`lmforge generate --checkpoint {model_dir} --prompt '...'` (pretrained); ask the context store: "
            f"`lmforge rag ask --store {retrieval.store} --checkpoint {retrieval.model} \"...\"`, "
            f"`lmforge agent --store {retrieval.store} --checkpoint {retrieval.model} \"...\"`.\n\n")


def write_report(out: Path, head: str, sections: list[str], figures: dict[str, Any]) -> Path:
    """Write `report.md` and `summary.json` into `out`; returns the report's path."""
    (out / SUMMARY_FILE).write_text(json.dumps(figures, indent=2) + "\n")
    report = out / REPORT_FILE
    report.write_text(head + "\n".join(sections))
    return report
