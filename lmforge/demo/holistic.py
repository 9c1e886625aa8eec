"""The demo's holistic evaluation: every stage's model under HELM's metric groups (accuracy, calibration,
selective answering and hallucination, robustness, fairness, toxicity, efficiency) on the held-out
people, and on the people pretraining never saw; with SFT's "I don't know" option trained beside the
plain SFT model to show its effect. Every sentence that states an outcome is computed from the numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmforge.demo.common import change, points
from lmforge.demo.finetuning import train_sft
from lmforge.demo.retrieval import K
from lmforge.eval import calibration as cal
from lmforge.eval.holistic import GROUPS, abstentions, answering_confidence, holistic_eval, outcomes
from lmforge.eval.report import plot_coverage, plot_reliability
from lmforge.eval.tasks import GenerationItem, Task
from lmforge.generate.session import Session
from lmforge.rag.prompts import cite, grounded_messages
from lmforge.rag.store import Store
from lmforge.world.people import World
from lmforge.world.tasks import qa_heldout, qa_unseen

DONT_KNOW_QUESTIONS = 1000  # questions about people outside the world, answered "I don't know who ... is."
PRETRAINED_SHOTS = 3
HOLISTIC_RELIABILITY_PNG, HOLISTIC_COVERAGE_PNG = "holistic-reliability.png", "holistic-coverage.png"
DONT_KNOW_MODEL = 'SFT + "I don\'t know"'


@dataclass
class Row:
    """A model as the holistic table evaluates it."""

    session: Session
    chat: bool = True
    shots: int = 0
    prepare: Callable[[Task], Task] | None = None


def grounded(store: Store) -> Callable[[Task], Task]:
    """Put the store's best source before each question, as `lmforge rag ask` does; the reference cites it."""
    def prepare(task: Task) -> Task:
        found = store.search_many([item.prompt for item in task.items], K)
        items = [GenerationItem(grounded_messages(item.prompt, [h.text for h in hits])[0]["content"],
                                cite(item.answer, *range(1, len(hits) + 1))) for item, hits in zip(task.items, found)]
        return replace(task, items=items)
    return prepare


def evaluate_row(row: Row, world: World, seed: int) -> dict[str, Any]:
    """The row's model on the held-out people (every group) and on the never-seen people (hallucination)."""
    options = dict(chat=row.chat, shots=row.shots, seed=seed, progress=False, prepare=row.prepare)
    known = holistic_eval(row.session, qa_heldout(world), GROUPS, **options)
    unseen = holistic_eval(row.session, qa_unseen(world), ("accuracy", "calibration", "selective"), **options)
    confidence = answering_confidence(outcomes(known)[0] + outcomes(unseen)[0],
                                      abstentions(known) + abstentions(unseen))
    correct = outcomes(known)[1] + outcomes(unseen)[1]
    return {"held_out": known["holistic"], "never_seen": unseen["holistic"],
            "both": {"curve": cal.coverage_curve(confidence, correct), "area": cal.selective_area(confidence, correct)}}


def holistic_stage(out: Path, world: World, seed: int, pretrained: Session, model_dir: Path, sft_steps: int,
                   models: dict[str, Path], retrieval_model: Path, store_dir: Path) -> tuple[str, dict[str, Any]]:
    """Train SFT with the "I don't know" option, evaluate every stage, and write the section and its plots."""
    _, dont_know, _ = train_sft(out, world, model_dir, pretrained.tokenizer, sft_steps, seed,
                                dont_know=DONT_KNOW_QUESTIONS)
    with Store.open(store_dir) as store:
        rows = {"pretrained": Row(pretrained, chat=False, shots=PRETRAINED_SHOTS),
                "SFT": Row(Session.load(models["SFT"])), DONT_KNOW_MODEL: Row(Session.load(dont_know)),
                "SFT + DPO + RPO": Row(Session.load(models["SFT + DPO + RPO"])),
                "SFT + retrieval tuning, with retrieval": Row(Session.load(retrieval_model), prepare=grounded(store))}
        figures = {name: evaluate_row(row, world, seed) for name, row in rows.items()}
    plot_reliability({n: f["held_out"]["calibration"]["bins"] for n, f in figures.items()},
                     out / HOLISTIC_RELIABILITY_PNG, "held-out people")
    plot_coverage({n: f["both"]["curve"] for n, f in figures.items()}, out / HOLISTIC_COVERAGE_PNG,
                  "held-out and never-seen people")
    print(f"[demo] holistic: {conclusions(figures)[0]}")
    return section(figures), figures


def conclusions(figures: dict[str, Any]) -> list[str]:
    """The sentences the numbers support: best calibrated, fewest hallucinations, the "I don't know"
    option's effect, the perturbation that hurts most, what name swaps change, what toxicity flags."""
    ece = {n: f["held_out"]["calibration"]["ece"] for n, f in figures.items()}
    wrong = {n: f["never_seen"]["selective"]["confident_wrong_rate"] for n, f in figures.items()}
    em = {n: f["held_out"]["accuracy"]["exact_match"] for n, f in figures.items()}
    sft, idk = figures["SFT"], figures[DONT_KNOW_MODEL]

    def moved(people: str, what: str) -> str:
        """How SFT's figure moved with the "I don't know" option."""
        pick = {"wrong": lambda f: f[people]["selective"]["confident_wrong_rate"],
                "abstained": lambda f: f[people]["selective"]["abstention_rate"],
                "em": lambda f: f[people]["accuracy"]["exact_match"]}[what]
        return change(pick(sft), pick(idk))

    best, worst = leaders(ece, min), leaders(ece, max)
    least = leaders(wrong, min)
    weak = [n for n in least if em[n] < max(em.values()) / 2]
    lines = [
        f"{names(best)} {'is' if len(best) == 1 else 'are'} the best calibrated on the held-out people (ECE "
        f"{ece[best[0]]:.3f}); {names(worst)} the worst ({ece[worst[0]]:.3f}).",
        f"{names(least)} {'gives' if len(least) == 1 else 'give'} the fewest confident (probability ≥ 0.5) wrong "
        f"answers about the people left out of pretraining: {wrong[least[0]]:.0%}" + (
            f"; but {names(weak)} also {'answers' if len(weak) == 1 else 'answer'} only "
            f"{', '.join(f'{em[n]:.0%}' for n in weak)} of the held-out questions right (best: "
            f"{max(em.values()):.0%})." if weak else "."),
        f"The \"I don't know\" option: confident wrong answers about never-seen people {moved('never_seen', 'wrong')} "
        f"and \"I don't know\" replies to them {moved('never_seen', 'abstained')}; exact match on the held-out "
        f"people {moved('held_out', 'em')}, \"I don't know\" replies to them {moved('held_out', 'abstained')}.",
    ]
    drops = sft["held_out"]["robustness"]["drops"]
    hardest = leaders(drops, max)
    lines.append(f"Of the perturbations, {names(hardest)} {'costs' if len(hardest) == 1 else 'cost'} SFT the most "
                 f"exact match ({shift(-drops[hardest[0]])})." if drops[hardest[0]] > 0 else
                 "No perturbation lowered SFT's exact match.")
    fair = {n: f["held_out"]["fairness"]["change_rate"] for n, f in figures.items()
            if f["held_out"]["fairness"]["items"]}
    if fair:
        lines.append(f"Swapping first names for names of another origin changes the fewest answers for "
                     f"{names(leaders(fair, min))} ({min(fair.values()):.0%} of the swapped questions), the most for "
                     f"{names(leaders(fair, max))} ({max(fair.values()):.0%}).")
    tox = {n: f["held_out"]["toxicity"] for n, f in figures.items()}
    flagged = leaders({n: t["toxicity_max"] for n, t in tox.items()}, max)[0]
    lines.append(f"The toxicity classifier ({tox[flagged]['classifier']}) scores {flagged}'s "
                 f"\"{tox[flagged]['most_toxic']}\" highest ({tox[flagged]['toxicity_max']:.2f}).")
    return lines


def leaders(values: dict[str, float], pick: Callable[..., float]) -> list[str]:
    """The names whose value is the `pick` (min or max) of all, in order (several on a tie)."""
    top = pick(values.values())
    return [n for n, v in values.items() if v == top]


def names(models: list[str]) -> str:
    return models[0] if len(models) == 1 else ", ".join(models[:-1]) + " and " + models[-1]


def shift(share: float) -> str:
    """A change of a share in signed percentage points, e.g. "-14 pts", "+0 pts"."""
    return f"{points(0, share):+d} pts"


def section(figures: dict[str, Any]) -> str:
    lines = [
        "## Holistic evaluation\n",
        "HELM's metric groups (`lmforge eval --metrics all`) for each stage's model, on the held-out people's "
        "questions (what pretraining stored) and on questions about the people left out of pretraining (whom no "
        "model here was trained on, so a confident wrong answer about them is a hallucination; the retrieval-tuned "
        "model can find them in the store, and its reference cites the source, as it was trained to answer). "
        "Confidence is the greedy answer's "
        "probability (exp of its summed token log-probabilities); calibration over 10 equal-mass bins. Robustness: "
        "exact match under typos, lower case, extra spaces, synonyms and a distractor sentence (mean and worst drop). "
        "Fairness: every first name swapped for one of another origin, in the prompt and the reference; closed-book, "
        "a swapped name is a person the model never read about, so its knowledge goes with the name, while with a "
        "source in the prompt the answer should not depend on it. "
        f"{DONT_KNOW_MODEL} is SFT with {DONT_KNOW_QUESTIONS} questions about people outside the world answered "
        "\"I don't know who ... is.\" added to its data. The pretrained model answers few-shot "
        f"({PRETRAINED_SHOTS} exemplars); the retrieval-tuned model reads the store's best source first.\n",
        "| model | held-out EM | ECE | Brier | never-seen: confident wrong | never-seen: \"I don't know\" | "
        "perturbed: mean change | worst change | right under all | names swapped: answers changed | toxicity (max) | "
        "generated tokens/s | GFLOPs per answer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [holistic_row(name, f) for name, f in figures.items()]
    lines += ["", "The \"I don't know\" option in detail:\n",
              "| model | held-out: exact match | held-out: \"I don't know\" | held-out: right when answering | "
              "never-seen: \"I don't know\" | never-seen: confident wrong |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("SFT", DONT_KNOW_MODEL):
        known, unseen = figures[name]["held_out"], figures[name]["never_seen"]
        em, declined = known["accuracy"]["exact_match"], known["selective"]["abstention_rate"]
        lines.append(f"| {name} | {em:.0%} | {declined:.0%} | {em / (1 - declined) if declined < 1 else 0:.0%} | "
                     f"{unseen['selective']['abstention_rate']:.0%} | "
                     f"{unseen['selective']['confident_wrong_rate']:.0%} |")
    lines += ["", *(f"- {s}" for s in conclusions(figures)), "",
              f"![reliability diagram]({HOLISTIC_RELIABILITY_PNG}) "
              f"![accuracy-coverage curve]({HOLISTIC_COVERAGE_PNG})", ""]
    return "\n".join(lines)


def holistic_row(name: str, f: dict[str, Any]) -> str:
    """A model's row of the holistic table, rendered from its `summary.json` figures."""
    known, unseen = f["held_out"], f["never_seen"]
    rob, fair, eff = known["robustness"], known["fairness"], known["efficiency"]
    swapped = f"{fair['change_rate']:.0%} ({shift(-fair['gap'])} EM)" if fair["items"] else "—"
    flops = "—" if eff["flops_per_item"] is None else f"{eff['flops_per_item'] / 1e9:.3f}"
    return (f"| {name} | {known['accuracy']['exact_match']:.0%} | {known['calibration']['ece']:.3f} | "
            f"{known['calibration']['brier']:.3f} | {unseen['selective']['confident_wrong_rate']:.0%} | "
            f"{unseen['selective']['abstention_rate']:.0%} | {shift(-rob['mean_drop'])} | "
            f"{shift(-rob['worst_drop'])} | "
            f"{rob['worst_case']:.0%} | {swapped} | {known['toxicity']['toxicity_max']:.2f} | "
            f"{eff['generated_tokens_per_second']:.0f} | {flops} |")
