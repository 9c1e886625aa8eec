"""`lmforge demo`: every stage in order on one world, then the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lmforge.demo.alignment import alignment_stage
from lmforge.demo.finetuning import prompting_section, sft_stage
from lmforge.demo.holistic import holistic_stage
from lmforge.demo.pretraining import pretraining_stage
from lmforge.demo.report import header, real_sizes_section, summary_section, write_report
from lmforge.demo.retrieval import retrieval_stage
from lmforge.demo.seq2seq import seq2seq_stage
from lmforge.generate.session import Session
from lmforge.world.people import world_of_size

T = TypeVar("T")


def run_demo(out: str | Path, seed: int = 0, *, people: int = 100, steps: int = 600, probes: int = 300,
             sft_steps: int = 300, align_steps: int = 150, t5_steps: int = 300) -> Path:
    """Run the demo into `out` and return the path of its report (beside it, `summary.json`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def timed(stage: str, run: Callable[[], T]) -> T:
        begun = time.perf_counter()
        result = run()
        seconds[stage] = time.perf_counter() - begun
        return result

    world = world_of_size(people, seed)
    pretrained = timed("pretraining", lambda: pretraining_stage(out, world, seed, steps, probes))
    finetuned = timed("finetuning", lambda: sft_stage(out, world, pretrained.model, pretrained.session, sft_steps,
                                                       seed))
    prompting, prompting_figures = timed("prompting", lambda: prompting_section(
        pretrained.session, Session.load(finetuned.adapter), seed, people))
    alignment = timed("alignment", lambda: alignment_stage(out, world, finetuned.adapter, seed, align_steps))
    retrieval = timed("retrieval", lambda: retrieval_stage(out, world, alignment.models["SFT"], seed, 4 * sft_steps))
    holistic, holistic_figures = timed("holistic", lambda: holistic_stage(
        out, world, seed, pretrained.session, pretrained.model, sft_steps, alignment.models, retrieval.model,
        retrieval.store))
    seq2seq = timed("seq2seq", lambda: seq2seq_stage(out, world, pretrained.corpus, seed, 3 * t5_steps, t5_steps))
    summary, summary_figures = timed("summary", lambda: summary_section(world, pretrained.session, alignment,
                                                                        retrieval, seed))
    world_part, rest = pretrained.sections[:2], pretrained.sections[2:]
    sections = [*world_part, summary, *rest, finetuned.section, prompting, alignment.section, retrieval.section,
                holistic, seq2seq.section, real_sizes_section()]
    figures = {"seed": seed, "people": len(world.people), "companies": len(world.companies),
               "pretraining": pretrained.figures, "finetuning": finetuned.figures, "prompting": prompting_figures,
               "alignment": alignment.figures, "retrieval": retrieval.figures, "holistic": holistic_figures,
               "seq2seq": seq2seq.figures, "summary": summary_figures, "seconds": seconds}
    head = header(out, seed, time.perf_counter() - started, pretrained.model, retrieval, seconds)
    report = write_report(out, head, sections, figures)
    print(f"[demo] report: {report}")
    return report
