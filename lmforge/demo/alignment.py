"""The demo's alignment stage: helpfulness and safety reward models, then DPO and PPO from the SFT
model, each scored on held-out prompts: reward, exact match, refusal and false-refusal rates. The
report's conclusions are computed from these figures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.align.dpo import DPOConfig, all_logprobs, pair_logprobs, train_dpo
from lmforge.align.losses import token_logprobs
from lmforge.align.ppo import PPOConfig, ppo
from lmforge.align.reward import RewardConfig, RewardScorer, combined_reward, train_reward
from lmforge.align.safety import RefusalReport, refusal_report
from lmforge.data.preference import PreferenceDataConfig, encode_pair, read_pairs
from lmforge.demo.alignment_goals import (
    EM_LOSS, NOISE, REFUSAL_LOSS, alignment_goals, gain_text, goals_table, paired_gain,
)
from lmforge.demo.common import change, greedy_chat_answers, mean, points, score_change
from lmforge.demo.rejection import SAMPLES, TEMPERATURE, TOP_P, rejection_stage
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete
from lmforge.io import jsonl_records
from lmforge.peft.adapters import merge_and_save
from lmforge.peft.method import AdapterConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.run_dir import RunDir, table_cell
from lmforge.world.documents import Question, questions, write_jsonl
from lmforge.world.people import World
from lmforge.world.preferences import FLAWS, outsider_pairs, preference_pairs, write_preference_data
from lmforge.world.safety import REFUSAL, leaks_phone_number, red_team_prompts

# The helpfulness reward model learns from every flaw of each training question and from OUTSIDERS pairs about
# people outside the world (see `outsider_pairs`), for 5x the alignment steps: with the world's ~70 people alone it
# learned them by heart and ranked held-out people's wrong-person replies near chance.
OUTSIDERS, REWARD_STEPS, REWARD_LR = 2500, {"helpful": 5, "safety": 1}, 3e-4
OUTSIDER_SHARE = 5 / 7  # at most this many outsider pairs per helpfulness pair of the world: a small world's few
# pairs are not swamped
DPO_BETA, DPO_LR = 0.1, 3e-4
# The fixed DPO: a tighter implicit KL constraint (beta) and the chosen reply's NLL (RPO; the LLaMA-3 recipe)
# weighted by RPO_ALPHA, on the helpfulness and safety pairs.
RPO_BETA, RPO_ALPHA = 0.5, 10.0
PPO_LR, PPO_KL, PPO_TARGET_KL = 1e-4, 0.1, 1.0
# LLaMA-2's whitening of each rollout's scores, and TRL's penalty for a reply the token limit cut (so ending the
# turn pays): without them the scores' scale and the length of the replies set the step size.
PPO_STABILISERS = {"whiten_scores": True, "missing_eos_penalty": 1.0}
# The held-out prompts every model is scored on: each held-out person's question in all its phrasings, beside the
# red-team prompts, and this many replies sampled per prompt. Gains over SFT are measured prompt by prompt; with one
# phrasing and two samples their standard errors (0.2-0.45) were as large as the gains to be measured.
EVAL_PHRASINGS, EVAL_SAMPLES = 3, 4
CLEAR_GAP = 10  # percentage points: a smaller difference between two shares is reported as "about the same"
RLHF_MODELS = ("SFT + rejection sampling", "SFT + PPO")  # trained on the RLHF prompts


@dataclass
class Prompted:
    """The measurements on the held-out people whose questions were among the RLHF prompts."""

    rewards: list[float]  # combined reward of the greedy reply to each of their questions
    sampled_rewards: list[float]
    exact_match: float
    another_person: float  # share of the greedy answers that name another person of the world, not the one asked

    def figures(self) -> dict[str, float]:
        return {"held_out_em": self.exact_match, "mean_reward_greedy": mean(self.rewards),
                "mean_reward_sampled": mean(self.sampled_rewards), "another_person_rate": self.another_person}


@dataclass
class Scores:
    rewards: list[float]  # combined reward of the greedy reply to each question about the held-out people no stage
    # asks about, and to each red-team prompt
    sampled_rewards: list[float]  # the same for replies sampled at temperature 1 (each prompt's mean over its samples)
    kl_to_sft: float  # nats per sampled reply
    exact_match: float  # held-out people's questions (those no stage asks about)
    another_person: float  # share of the greedy answers to them that name another person of the world
    refusals: RefusalReport
    prompted: Prompted  # the held-out people in the RLHF prompts (the fields above leave them out)

    @property
    def reward(self) -> float:
        return mean(self.rewards)

    @property
    def sampled_reward(self) -> float:
        return mean(self.sampled_rewards)

    def figures(self) -> dict[str, float]:
        """The model's row of `summary.json`."""
        return {"held_out_em": self.exact_match, "refusal_rate": self.refusals.refusal_rate,
                "false_refusal_rate": self.refusals.false_refusal_rate, "mean_reward_greedy": self.reward,
                "mean_reward_sampled": self.sampled_reward, "kl_to_sft": self.kl_to_sft, "leaked": self.refusals.leaked,
                "another_person_rate": self.another_person, "prompted_people": self.prompted.figures()}


@dataclass
class Alignment:
    section: str
    figures: dict[str, Any]  # for summary.json
    models: dict[str, Path]  # "SFT", "SFT + DPO", "SFT + DPO + RPO", "SFT + PPO": loadable checkpoints
    scores: dict[str, Scores]
    scorers: dict[str, RewardScorer]  # "helpful", "safety"


@dataclass
class Trained:
    """What the stage trained: the merged SFT model, the preference files, the reward models, the
    DPO and PPO adapters, and the seconds each part took."""

    merged: Path
    prefs: Path  # DPO's: one flaw per training question
    every_flaw: Path  # the helpfulness reward model's, beside the outsiders' pairs
    reward_pairs: dict[str, int]  # the helpfulness reward model's pairs: "world" (helpful ones) and "outsiders"
    heldout: Path  # every flaw of each held-out question
    reward_dirs: dict[str, Path]
    rejection: Path  # fine-tuned on the best of K sampled replies
    rejection_round: dict[str, Any]  # its mean best score, mean score and selection gain
    dpo: Path
    rpo: Path  # DPO with the chosen reply's NLL term, on helpfulness and safety pairs
    ppo: Path
    iterations: int
    seconds: dict[str, float]


def train_models(out: Path, world: World, sft_adapter: Path, seed: int, steps: int) -> Trained:
    """From the SFT model: the safety reward model, rejection sampling and both DPO runs (`steps` each), the
    helpfulness reward model (`REWARD_STEPS["helpful"]` times as long) and PPO (`steps // 4` iterations)."""
    merged = merge_and_save(sft_adapter, out / "sft" / "merged")
    prefs = write_preference_data(world, out / "world" / "preferences.jsonl", "train", seed=seed)
    every_flaw = write_preference_data(world, out / "world" / "preferences-every-flaw.jsonl", "train", seed=seed,
                                       every_flaw=True)
    world_pairs = [record for _, record in jsonl_records(every_flaw)]
    helpful = sum(record["kind"] == "helpful" for record in world_pairs)
    reward_pairs = {"world": helpful, "outsiders": min(OUTSIDERS, int(OUTSIDER_SHARE * helpful))}
    reward_prefs = write_jsonl(out / "world" / "preferences-reward.jsonl",
                               [*world_pairs, *outsider_pairs(world, reward_pairs["outsiders"], seed=seed)])
    heldout = write_preference_data(world, out / "world" / "preferences-heldout.jsonl", "heldout", seed=seed,
                                    every_flaw=True)
    train = TrainConfig(steps=steps, micro_batch_size=16, lr=1e-3, warmup_steps=10, weight_decay=0.0,
                        log_every=10, eval_every=max(1, steps // 3), save_every=steps, seed=seed)
    seconds, start = {}, time.perf_counter()
    reward_dirs = {kind: train_reward(RewardConfig(
        out_dir=out / f"reward-{kind}", base=merged,
        train=train.model_copy(update={"lr": REWARD_LR, "steps": steps * REWARD_STEPS[kind],
                                       "eval_every": steps * REWARD_STEPS[kind] // 2,
                                       "save_every": steps * REWARD_STEPS[kind]}),
        data=PreferenceDataConfig(train_path=reward_prefs, val_path=heldout, kind=kind, max_len=128)))
        for kind in ("helpful", "safety")}
    seconds["reward"], start = time.perf_counter() - start, time.perf_counter()
    prompts = out / "world" / "ppo-prompts.jsonl"
    asked = prompted_people(world)
    prompts.write_text("".join(json.dumps(p) + "\n" for p in
                               [{"prompt": q.question} for q in questions(world, "train", seed=seed)] +
                               [{"prompt": q.question} for q in heldout_questions(world, seed) if q.person in asked] +
                               [{"prompt": r.prompt, "risky": r.risky} for r in red_team_prompts(world, "train")]))
    scorers = {kind: RewardScorer.load(path) for kind, path in reward_dirs.items()}
    budget = reply_tokens(Tokenizer.from_dir(merged))
    rejection, rejection_round = rejection_stage(out, merged, prompts, scorers, reward_dirs["helpful"], steps, seed,
                                                 budget)
    seconds["rejection"], start = time.perf_counter() - start, time.perf_counter()
    dpo_adapter, rpo_adapter = (train_dpo(DPOConfig(
        out_dir=out / name, base=merged, beta=beta, rpo_alpha=rpo_alpha,
        data=PreferenceDataConfig(train_path=prefs, val_path=heldout, max_len=128, kind=kind),
        adapter=AdapterConfig(method="lora", r=16, alpha=32, targets="all-linear", seed=seed),
        train=train.model_copy(update={"lr": DPO_LR})))
        for name, beta, rpo_alpha, kind in (("dpo", DPO_BETA, None, "helpful"), ("dpo-rpo", RPO_BETA, RPO_ALPHA, None)))
    seconds["dpo"] = seconds["rpo"] = (time.perf_counter() - start) / 2  # two runs of the same length
    start = time.perf_counter()
    iterations = max(2, steps // 4)
    ppo_adapter = ppo(PPOConfig.model_validate({
        "out_dir": out / "ppo", "policy": merged, "reward": reward_dirs["helpful"],
        "safety_reward": reward_dirs["safety"], "prompts": prompts,
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "targets": "all-linear", "seed": seed},
        "ppo": {"iterations": iterations, "batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 2, "lr": PPO_LR,
                **PPO_STABILISERS,
                "sampling": {"max_new_tokens": budget}, "init_kl_coef": PPO_KL, "target_kl": PPO_TARGET_KL,
                "save_every": iterations, "seed": seed}}))
    seconds["ppo"] = time.perf_counter() - start
    return Trained(merged, prefs, every_flaw, reward_pairs, heldout, reward_dirs, rejection,
                   rejection_round, dpo_adapter, rpo_adapter, ppo_adapter, iterations, seconds)


def alignment_stage(out: Path, world: World, sft_adapter: Path, seed: int, steps: int) -> Alignment:
    """Train the reward models, DPO and PPO, measure them on held-out prompts, and write the section."""
    trained = train_models(out, world, sft_adapter, seed, steps)
    scorers = {kind: RewardScorer.load(path) for kind, path in trained.reward_dirs.items()}
    sft = Session.load(trained.merged)
    redrawn = redraw(world, trained.every_flaw, out / "world" / "preferences-redrawn.jsonl", seed + 1)
    flaws, seen, fresh = (flaw_accuracy(path, scorers, sft) for path in (trained.heldout, trained.every_flaw,
                                                                           redrawn))
    models = {"SFT": trained.merged, "SFT + rejection sampling": trained.rejection, "SFT + DPO": trained.dpo,
              "SFT + DPO + RPO": trained.rpo, "SFT + PPO": trained.ppo}
    scores = {name: score(Session.load(path), sft, world, scorers, seed) for name, path in models.items()}
    dpo_val, rpo_val = ([r for r in RunDir(out / name).records() if "val_preference_accuracy" in r][-1]
                        for name in ("dpo", "dpo-rpo"))
    ppo_log = RunDir(out / "ppo").records()
    figures = {
        "preference_pairs": sum(1 for _ in trained.prefs.open()),
        "reward_pairs": trained.reward_pairs,
        "reward_model_accuracy": {kind: [r for r in RunDir(out / f"reward-{kind}").records() if "val_accuracy" in r][-1]
                                  ["val_accuracy"] for kind in trained.reward_dirs},
        "flaws": {flaw: {"pairs": len(oks), "reward_model": mean(oks), "sft_likelihood": mean(likely)}
                  for flaw, (oks, likely) in flaws.items()},
        "wrong_value_ranked_lower": {"trained_pairs": mean(seen["wrong_value"][0]),
                                     "redrawn_pairs": mean(fresh["wrong_value"][0]),
                                     "heldout_pairs": mean(flaws["wrong_value"][0]),
                                     "sft_likelihood": mean(flaws["wrong_value"][1])},
        "dpo_preference_accuracy": {"sft": dpo_val["val_reference_preference_accuracy"],
                                    "dpo": dpo_val["val_preference_accuracy"]},
        "rpo_preference_accuracy": {"sft": rpo_val["val_reference_preference_accuracy"],
                                    "dpo": rpo_val["val_preference_accuracy"]},
        "rejection_sampling": {k: trained.rejection_round[k] for k in ("samples", "mean_best_score", "mean_score",
                                                                        "selection_gain")},
        "ppo": {"iterations": trained.iterations,
                "reward": {"first": ppo_log[0]["reward"], "last": ppo_log[-1]["reward"]},
                "kl": ppo_log[-1]["kl"]},
        "models": {name: sc.figures() for name, sc in scores.items()},
        "reward_gains": {name: {"greedy": paired_gain(scores["SFT"].rewards, sc.rewards),
                                "sampled": paired_gain(scores["SFT"].sampled_rewards, sc.sampled_rewards)}
                         for name, sc in scores.items() if name != "SFT"},
        "prompted_people": sorted(prompted_people(world)),
        "prompted_reward_gains": {name: {
            "greedy": paired_gain(scores["SFT"].prompted.rewards, sc.prompted.rewards),
            "sampled": paired_gain(scores["SFT"].prompted.sampled_rewards, sc.prompted.sampled_rewards)}
            for name, sc in scores.items() if name != "SFT"},
    }
    goals = alignment_goals(figures, PPO_TARGET_KL)
    figures["goals"] = [g._asdict() for g in goals]
    section = alignment_section(figures, trained, scores, steps) + "\n" + goals_table(goals)
    print("[demo] alignment: refusal " + ", ".join(f"{n} {sc.refusals.refusal_rate:.0%}" for n, sc in scores.items())
          + "; reward " + ", ".join(f"{n} {sc.reward:.2f}" for n, sc in scores.items()))
    return Alignment(section, figures, models, scores, scorers)


def alignment_section(figures: dict[str, Any], trained: Trained, scores: dict[str, Scores], steps: int) -> str:
    """The stage's report section: what was trained, the measured figures, and what they show."""
    val, ranked, dpo, ppo_figures = (figures["reward_model_accuracy"], figures["wrong_value_ranked_lower"],
                                     figures["dpo_preference_accuracy"], figures["ppo"])
    seconds = trained.seconds
    lines = [
        "## Alignment: reward models, DPO and PPO\n",
        f"Preference pairs about the training people ({figures['preference_pairs']}), judged as InstructGPT's and "
        "LLaMA-2's annotators judge: the true answer over "
        + ", ".join(f.description for f in FLAWS.values() if f.kind == "helpful")
        + " (*helpful*; all but the last can be told from the text, the last needs the person's fact); a refusal over "
        "a "
        "phone-number leak, over the harmless look-alike's answer and over garbled text on prompts asking for the "
        "private number, and the answer over a refusal on their harmless look-alikes (*safety*).\n",
        f"- Reward models (Bradley–Terry, trunk from the SFT model, lr {REWARD_LR:g}, {seconds['reward']:.0f} s): "
        f"the safety model on the safety pairs for {steps * REWARD_STEPS['safety']} steps; the helpfulness model for "
        f"{steps * REWARD_STEPS['helpful']} steps on every flaw of each training question "
        f"({figures['reward_pairs']['world']} pairs) and {figures['reward_pairs']['outsiders']} questions about people "
        "outside the world, the true answer over the same sentence about another outsider or over a training "
        "person's true sentence: with many names, it learns to match the reply's person to the question's rather "
        "than the training people by heart, and that a fact it knows is still the wrong reply about someone else. "
        f"Pairwise accuracy on held-out people's pairs (every flaw of each question): "
        f"**{val['helpful']:.0%}** (helpfulness) and "
        f"**{val['safety']:.0%}** (safety). As in LLaMA-2, the score used is the safety model's on risky prompts (or "
        "where it is low), the helpfulness model's otherwise. By what is wrong with the rejected reply:\n",
        "| rejected reply (held-out people) | pairs | reward model ranks it lower | SFT model's likelihood ranks it "
        "lower |",
        "|---|---:|---:|---:|",
        *[f"| {FLAWS[flaw].description}{'' if FLAWS[flaw].learnable else ' (needs the fact)'} | {f['pairs']} | "
          f"{f['reward_model']:.0%} | {f['sft_likelihood']:.0%} |" for flaw, f in figures["flaws"].items()],
        "",
        learnable_conclusion(figures["flaws"]),
        reward_model_conclusion(ranked) + "\n",
        f"- DPO on the helpfulness pairs (β {DPO_BETA}, LoRA, {steps} steps, {seconds['dpo']:.0f} s): held-out "
        f"preference accuracy {dpo['sft']:.0%} (SFT) → **{dpo['dpo']:.0%}**. The fix (*SFT + DPO + RPO*): DPO with "
        f"β {RPO_BETA:g} plus {RPO_ALPHA:g} × the chosen reply's NLL (RPO, `rpo_alpha`), on the helpfulness *and* "
        "safety pairs "
        f"({seconds['rpo']:.0f} s): held-out preference accuracy {figures['rpo_preference_accuracy']['sft']:.0%} → "
        f"**{figures['rpo_preference_accuracy']['dpo']:.0%}**.",
        f"- The RLHF prompts (rejection sampling's and PPO's): the training questions and red-team prompts, and the "
        f"questions, without their answers, about {len(figures['prompted_people'])} of the held-out people (every "
        "other by name), as InstructGPT's RLHF prompts were not its SFT prompts; the goals are measured on the other "
        "held-out people, whom no stage names.",
        f"- Rejection sampling (LLaMA-2's first RLHF stage): {SAMPLES} replies sampled per prompt "
        f"(temperature {TEMPERATURE:g}, top-p {TOP_P:g}), the best "
        f"by the combined reward kept, the SFT model fine-tuned on them with its own SFT data replayed (LoRA, {steps} "
        "steps, "
        f"{seconds['rejection']:.0f} s): the kept replies score {figures['rejection_sampling']['mean_best_score']:.2f} "
        f"against {figures['rejection_sampling']['mean_score']:.2f} for all samples (selection gain "
        f"{figures['rejection_sampling']['selection_gain']:+.2f}).",
        f"- PPO against the combined reward (LoRA, {trained.iterations} iterations of 32 rollouts, each rollout's "
        "scores whitened as LLaMA-2 does, a reply cut at the token limit scored "
        f"{PPO_STABILISERS['missing_eos_penalty']:g} lower, per-token KL penalty "
        f"β₀ {PPO_KL} adapted towards {PPO_TARGET_KL:g} nats per response, {seconds['ppo']:.0f} s): training reward "
        f"{ppo_figures['reward']['first']:.2f} → {ppo_figures['reward']['last']:.2f}, KL to the SFT model "
        f"{ppo_figures['kl']:.2f} nats per response. On held-out prompts, the mean reward of sampled replies "
        f"(temperature 1, what PPO optimises) goes {scores['SFT'].sampled_reward:.2f} (SFT) → "
        f"**{scores['SFT + PPO'].sampled_reward:.2f}**, at {scores['SFT + PPO'].kl_to_sft:.2f} nats from SFT per "
        "reply.\n",
        "![PPO reward and KL](ppo/reward.png)\n",
        "| model | mean reward, greedy (held-out) | mean reward, sampled | KL to SFT (nats per reply) | exact match "
        "(held-out people) | refusal rate (red team) | false refusals (look-alikes) | people in the RLHF prompts: "
        "mean reward, greedy | sampled | exact match |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sc in scores.items():
        prompted = sc.prompted.figures()
        lines.append(f"| {name} | {sc.reward:.2f} | {sc.sampled_reward:.2f} | {sc.kl_to_sft:.2f} | "
                     f"{sc.exact_match:.0%} | "
                     f"{sc.refusals.refusal_rate:.0%} | {sc.refusals.false_refusal_rate:.0%} | "
                     f"{prompted['mean_reward_greedy']:.2f} | {prompted['mean_reward_sampled']:.2f} | "
                     f"{prompted['held_out_em']:.0%} |")
    lines += ["", policy_conclusion(figures["models"], figures["reward_gains"]), "",
              prompted_conclusion(figures["reward_gains"], figures["prompted_reward_gains"]), "",
              naming_conclusion(figures["models"], figures["flaws"]["wrong_person"]["reward_model"]), "",
              "| red-team prompt (held-out person) | " + " | ".join(scores) + " |", "|---|" + "---|" * len(scores)]
    replies = [sc.refusals.replies for sc in scores.values()]
    for row in list(zip(*replies))[:6]:
        lines.append(f"| {row[0][0].prompt} | " + " | ".join(table_cell(reply, 40) for _, reply in row) + " |")
    return "\n".join(lines) + "\n"


def learnable_conclusion(flaws: dict[str, dict[str, float]]) -> str:
    """How well the reward models rank the flaws that can be told from the text, from the measured shares."""
    learnable = {flaw: f["reward_model"] for flaw, f in flaws.items() if FLAWS[flaw].learnable}
    worst = min(learnable, key=learnable.get)
    return (f"On the {len(learnable)} kinds of flaw that can be told from the text, the reward models rank the "
            f"held-out rejected reply lower in at least {learnable[worst]:.0%} of pairs (the hardest: "
            f"{FLAWS[worst].description}).\n")


def reward_model_conclusion(ranked: dict[str, float]) -> str:
    """What the helpfulness reward model's ranking of wrong values shows, from the measured shares."""
    text = ("A wrong value needs the person's fact: the SFT model's own likelihood ranks "
            f"{ranked['sft_likelihood']:.0%} "
            f"of the held-out pairs right. The reward model ranks {ranked['trained_pairs']:.0%} of its training pairs' "
            f"wrong values lower, {ranked['redrawn_pairs']:.0%} of new pairs drawn for the same people (questions and "
            f"wrong values drawn again) and {ranked['heldout_pairs']:.0%} of the held-out people's: ")
    gap = points(ranked["heldout_pairs"], ranked["trained_pairs"])
    if gap >= CLEAR_GAP:
        text += (f"{gap} points better on the pairs it was shown than on held-out people's, so it has learnt those "
                 "pairs more than the facts behind them")
    elif gap <= -CLEAR_GAP:
        text += f"{-gap} points better on held-out people's pairs than on those it was shown"
    else:
        text += f"within {abs(gap)} points on the pairs it was shown and on held-out people's"
    behind = points(ranked["heldout_pairs"], ranked["sft_likelihood"])
    if abs(behind) < CLEAR_GAP:
        return text + f"; on held-out pairs it is within {abs(behind)} points of the SFT model's likelihood."
    side = "behind" if behind > 0 else "ahead of"
    return text + f"; on held-out pairs it is {abs(behind)} points {side} the SFT model's likelihood."


def policy_conclusion(models: dict[str, dict[str, float]], reward_gains: dict[str, dict[str, dict[str, float]]]) -> str:
    """What DPO and PPO changed against SFT on held-out prompts, from the measured figures (`reward_gains`: each
    model's paired reward gains over SFT)."""
    sft, dpo, rpo, ppo_ = models["SFT"], models["SFT + DPO"], models["SFT + DPO + RPO"], models["SFT + PPO"]
    text = (f"SFT, with the safety demonstrations in its data, refuses {sft['refusal_rate']:.0%} of red-team prompts. "
            f"DPO on helpfulness pairs alone: refusal rate {change(sft['refusal_rate'], dpo['refusal_rate'])}, "
            f"held-out exact match {change(sft['held_out_em'], dpo['held_out_em'])}. With the NLL term and the safety "
            f"pairs: refusal rate {change(sft['refusal_rate'], rpo['refusal_rate'])}, held-out exact match "
            f"{change(sft['held_out_em'], rpo['held_out_em'])}, false refusals "
            f"{change(sft['false_refusal_rate'], rpo['false_refusal_rate'])}. PPO, scored by the safety reward "
            f"model on risky prompts as LLaMA-2 does: greedy replies' mean reward "
            f"{score_change(sft['mean_reward_greedy'], ppo_['mean_reward_greedy'])}, exact match "
            f"{change(sft['held_out_em'], ppo_['held_out_em'])}, "
            f"refusal rate {change(sft['refusal_rate'], ppo_['refusal_rate'])}. ")
    gain = reward_gains["SFT + PPO"]["greedy"]
    if 0 < gain["mean"] <= NOISE * gain["standard_error"]:
        return text + (f"The greedy reward's change (+{gain['mean']:.2f}) is within {NOISE} standard errors "
                       f"({gain['standard_error']:.2f}, prompt by prompt) of none: PPO did not measurably raise it.")
    reward_up = gain["mean"] > 0
    moved = {name: (points(sft[key], ppo_[key]), allowed) for name, key, allowed in (
        ("exact match", "held_out_em", EM_LOSS), ("refusals", "refusal_rate", REFUSAL_LOSS))}
    lost = [n for n, (d, allowed) in moved.items() if d < -allowed]
    gained = [n for n, (d, _) in moved.items() if d > 0]
    if reward_up and lost:
        return text + (f"The reward rose while {' and '.join(lost)} fell by more than the goals allow: PPO found "
                       "replies these small reward models over-rate (reward hacking) — compare the replies below.")
    if reward_up and gained:
        return text + f"The reward rose together with {' and '.join(gained)}."
    if reward_up:
        return text + "The reward rose, with exact match and refusals within the goals' limits."
    return text + "PPO did not raise the reward of greedy replies over SFT's."


def prompted_conclusion(gains: dict[str, dict[str, dict[str, float]]],
                        prompted: dict[str, dict[str, dict[str, float]]]) -> str:
    """Whether what rejection sampling and PPO learnt from their prompts about held-out people carries to the
    held-out people they never saw, from the paired greedy reward gains on each group."""
    def measurable(gain: dict[str, float]) -> bool:
        return gain["mean"] > NOISE * gain["standard_error"]

    parts = []
    for name in RLHF_MODELS:
        inside, outside = prompted[name]["greedy"], gains[name]["greedy"]
        text = (f"{name.removeprefix('SFT + ')}: greedy replies' mean reward {gain_text(inside)} over SFT's on the "
                f"held-out people in its prompts, {gain_text(outside)} on the others; ")
        if measurable(inside) and not measurable(outside):
            text += "what it learnt about the people it was asked about did not carry to people it never saw"
        elif measurable(inside):
            text += "it carried to people it never saw"
        else:
            text += "it did not measurably raise the reward even on the people it was asked about"
        parts.append(text)
    return "Per group of held-out people (gain ± standard error, prompt by prompt): " + "; ".join(parts) + "."


def naming_conclusion(models: dict[str, dict[str, Any]], ranked_lower: float) -> str:
    """How often each model's greedy answers name another person than the one asked, on each group of held-out
    people, and whether rejection sampling and PPO changed it where their prompts asked and elsewhere."""
    def rates(name: str) -> tuple[float, float]:
        return models[name]["prompted_people"]["another_person_rate"], models[name]["another_person_rate"]

    text = (f"The reward models rank an answer about another person lower in {ranked_lower:.0%} of held-out pairs. "
            "Greedy replies that name another person than the one asked, on the held-out people in the RLHF prompts "
            "and on the others: " + ", ".join(f"{name.removeprefix('SFT + ')} {rates(name)[0]:.0%} and "
                                              f"{rates(name)[1]:.0%}" for name in ("SFT", *RLHF_MODELS)) + ".")
    for name in RLHF_MODELS:
        inside, outside = (points(before, after) for before, after in zip(rates("SFT"), rates(name)))
        method = name.removeprefix("SFT + ")
        text += (f" {method[0].upper() + method[1:]}: {inside:+d} points on the people in its prompts, "
                 f"{outside:+d} on the others")
        if inside <= -CLEAR_GAP < outside:
            text += "; it learnt the names of the people it was asked about one by one, not to take the name from " \
                    "the question"
        elif inside <= -CLEAR_GAP and outside <= -CLEAR_GAP:
            text += "; it learnt to name the person asked, on people it never saw too"
        elif max(abs(inside), abs(outside)) < CLEAR_GAP:
            text += f"; a change of less than {CLEAR_GAP} points on both"
        text += "."
    return text


def redraw(world: World, trained: Path, path: Path, seed: int) -> Path:
    """The training people's preference pairs drawn again with `seed`, without those in `trained`."""
    def key(record: dict) -> str:
        return json.dumps([record["prompt"], record["rejected"]])

    seen = {key(json.loads(line)) for line in trained.read_text().splitlines()}
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n"
                            for p in preference_pairs(world, "train", seed=seed) if key(p) not in seen))
    return path


@torch.no_grad()
def flaw_accuracy(path: Path, scorers: dict[str, RewardScorer], sft: Session,
                  max_len: int = 128) -> dict[str, tuple[list[bool], list[bool]]]:
    """For each flaw of the world's preference pairs in `path`: whether the reward model of the
    pair's kind, and whether the SFT model's likelihood, rank each pair's chosen reply higher."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    pairs = read_pairs(path)
    likely = [bool(c > r) for c, r in
              all_logprobs(lambda batch: pair_logprobs(sft.model, batch),
                           [encode_pair(sft.tokenizer, p, max_len) for p in pairs], 32, sft.tokenizer.pad_id or 0,
                           next(sft.model.parameters()).device).tolist()]
    out: dict[str, tuple[list[bool], list[bool]]] = {flaw: ([], []) for flaw in FLAWS}
    for kind, scorer in scorers.items():
        rows = [i for i, p in enumerate(pairs) if p.kind == kind]
        prompts = [pairs[i].prompt for i in rows]
        chosen = scorer.score(prompts, [pairs[i].chosen[-1]["content"] for i in rows])
        rejected = scorer.score(prompts, [pairs[i].rejected[-1]["content"] for i in rows])
        for i, c, r in zip(rows, chosen, rejected):
            out[records[i]["flaw"]][0].append(c > r)
            out[records[i]["flaw"]][1].append(likely[i])
    return {flaw: lists for flaw, lists in out.items() if lists[0]}


def reply_tokens(tokenizer: Tokenizer) -> int:
    """New tokens for a sampled reply: room for the refusal, the longest demonstrated reply (some thirty
    tokens of the demo's small tokenizer, twice an answer's), and its end of turn."""
    return len(tokenizer.encode(REFUSAL)) + 4


def heldout_questions(world: World, seed: int) -> list[Question]:
    """The questions about held-out people every model is scored on, in all `EVAL_PHRASINGS`."""
    return questions(world, "heldout", phrasings=EVAL_PHRASINGS, seed=seed)


def prompted_people(world: World) -> set[str]:
    """Every other held-out person by name: those asked about in rejection sampling's and PPO's prompts, without the
    answers, as InstructGPT's RLHF prompts were not its SFT prompts (SFT already answers its own training questions
    as the reward model likes, so they teach RLHF little). The goals are measured on the other held-out people."""
    return set(sorted(p.name for p in world.pretraining_people() if p.split == "heldout")[::2])


def heldout_prompts(world: World, seed: int) -> tuple[list[list[dict]], torch.Tensor]:
    """The held-out people's questions and red-team prompts as chats, and which prompts are risky."""
    qs, red_team = heldout_questions(world, seed), red_team_prompts(world, "heldout")
    chats = [[{"role": "user", "content": q.question}] for q in qs] + \
            [[{"role": "user", "content": r.prompt}] for r in red_team]
    return chats, torch.tensor([False] * len(qs) + [r.risky for r in red_team])


def combined_score(scorers: dict[str, RewardScorer], chats: list[list[dict]], replies: list[str],
                   risky: torch.Tensor) -> torch.Tensor:
    """LLaMA-2's combination of the two reward models' scores, one per reply."""
    helpful = torch.tensor(scorers["helpful"].score(chats, replies))
    safety = torch.tensor(scorers["safety"].score(chats, replies))
    return combined_reward(helpful, safety, risky)


@torch.no_grad()
def response_logprob(model: torch.nn.Module, prompt: list[int], reply: list[int]) -> float:
    """log p(reply | prompt) under `model`: the sum over the reply's tokens."""
    ids = torch.tensor([prompt + reply], device=next(model.parameters()).device)
    logps = token_logprobs(model(ids[:, :-1]), ids[:, 1:])[0, len(prompt) - 1 :]
    return float(logps.sum())


def sampled_reward(session: Session, sft: Session, world: World, scorers: dict[str, RewardScorer], seed: int,
                   samples: int = EVAL_SAMPLES) -> tuple[list[float], float]:
    """Each held-out prompt's mean combined reward of replies sampled at temperature 1, and the mean KL from the
    SFT model per reply (log p_model - log p_SFT of each sampled reply: an unbiased estimate)."""
    chats, risky = heldout_prompts(world, seed)
    params = SamplingParams(max_new_tokens=reply_tokens(sft.tokenizer), temperature=1.0, seed=seed,
                            stop_token_ids=session.greedy(1).stop_token_ids)
    prompts = [session.chat_prompt(c, reserve=params.max_new_tokens) for c in chats * samples]
    done = [c for start in range(0, len(prompts), 32)
            for c in complete(session.engine, session.tokenizer, prompts[start : start + 32], params)]
    rewards = combined_score(scorers, chats * samples, [c.text.strip() for c in done], risky.repeat(samples))
    kl = [response_logprob(session.model, p, c.token_ids) - response_logprob(sft.model, p, c.token_ids)
          for p, c in zip(prompts, done)]
    return rewards.view(samples, len(chats)).mean(0).tolist(), sum(kl) / len(kl)


def score(session: Session, sft: Session, world: World, scorers: dict[str, RewardScorer], seed: int) -> Scores:
    """Reward (LLaMA-2's combination) of greedy and sampled replies, KL from `sft`, exact match and refusal rates,
    on held-out prompts: those about the people in the RLHF prompts apart."""
    qs = heldout_questions(world, seed)
    answers = greedy_chat_answers(session, qs)
    names = [p.name for p in world.people]
    other = [names_another_person(a, q.person, names) for (a, _), q in zip(answers, qs)]
    refusals = refusal_report(session, red_team_prompts(world, "heldout"), leaks_phone_number)
    chats, risky = heldout_prompts(world, seed)
    replies = [a for a, _ in answers] + [r for _, r in refusals.replies]
    greedy = combined_score(scorers, chats, replies, risky).tolist()
    sampled, kl = sampled_reward(session, sft, world, scorers, seed)
    asked = prompted_people(world)
    inside = [q.person in asked for q in qs] + [False] * len(refusals.replies)

    def part(values: list, prompted: bool) -> list:
        return [v for v, flag in zip(values, inside) if flag == prompted]

    return Scores(part(greedy, False), part(sampled, False), kl, mean(part(answers, False)), mean(part(other, False)),
                  refusals, Prompted(part(greedy, True), part(sampled, True), mean(part(answers, True)),
                                     mean(part(other, True))))


def names_another_person(reply: str, asked: str, names: list[str]) -> bool:
    """Whether `reply` names someone of `names` but not `asked`: an answer about another person."""
    return asked not in reply and any(name in reply for name in names if name != asked)
