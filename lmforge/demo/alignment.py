"""The demo's alignment stage: helpfulness and safety reward models, then DPO and PPO from the SFT
model, each scored on held-out prompts: reward, exact match, refusal and false-refusal rates."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.align.dpo import DPOConfig, all_logprobs, pair_logprobs, train_dpo
from lmforge.align.ppo import PPOConfig, ppo
from lmforge.align.reward import RewardConfig, RewardScorer, combined_reward, train_reward
from lmforge.align.safety import RefusalReport, refusal_report
from lmforge.data.preference import PreferenceDataConfig, encode_pair, read_pairs
from lmforge.data.world import (
    FLAWS, World, preference_pairs, questions, red_team_prompts, write_preference_data,
)
from lmforge.demo.common import exact_match, mean
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.peft.adapters import merge_and_save
from lmforge.peft.method import AdapterConfig
from lmforge.report import table_cell
from lmforge.train.loop import TrainConfig

DPO_BETA, DPO_LR = 0.1, 3e-4
PPO_LR, PPO_KL, PPO_TARGET_KL = 5e-5, 0.1, 1.0  # at 1e-4 the policy drifted from SFT in some runs (KL 5 nats)


@dataclass
class Scores:
    reward: float  # mean combined reward-model score over held-out questions and red-team prompts
    exact_match: float  # held-out people's questions
    refusals: RefusalReport


@dataclass
class Alignment:
    section: str
    models: dict[str, Path]  # "SFT", "SFT + DPO", "SFT + PPO": loadable checkpoints
    scores: dict[str, Scores]
    scorers: dict[str, RewardScorer]  # "helpful", "safety"


def alignment_stage(out: Path, world: World, sft_adapter: Path, seed: int, steps: int) -> Alignment:
    """Reward models and DPO (`steps` each), PPO (`steps // 4` iterations) from the SFT model."""
    merged = merge_and_save(sft_adapter, out / "sft" / "merged")
    prefs = write_preference_data(world, out / "world" / "preferences.jsonl", "train", seed=seed)
    heldout = write_preference_data(world, out / "world" / "preferences-heldout.jsonl", "heldout", seed=seed)
    rm_train = TrainConfig(steps=steps, micro_batch_size=16, lr=1e-3, warmup_steps=10, weight_decay=0.0,
                           log_every=10, eval_every=max(1, steps // 3), save_every=steps, seed=seed)
    start = time.perf_counter()
    reward_dirs = {kind: train_reward(RewardConfig(
        out_dir=out / f"reward-{kind}", base=merged, train=rm_train,
        data=PreferenceDataConfig(train_path=prefs, val_path=heldout, kind=kind, max_len=128)))
        for kind in ("helpful", "safety")}
    rm_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dpo_adapter = train_dpo(DPOConfig(
        out_dir=out / "dpo", base=merged, beta=DPO_BETA,
        data=PreferenceDataConfig(train_path=prefs, val_path=heldout, max_len=128, kind="helpful"),
        adapter=AdapterConfig(method="lora", r=16, alpha=32, targets="all-linear", seed=seed),
        train=TrainConfig(steps=steps, micro_batch_size=16, lr=DPO_LR, warmup_steps=10, weight_decay=0.0,
                          log_every=10, eval_every=max(1, steps // 3), save_every=steps, seed=seed)))
    dpo_seconds = time.perf_counter() - start

    prompts = out / "world" / "ppo-prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in
                               [{"prompt": q.question} for q in questions(world, "train", seed=seed)] +
                               [{"prompt": r.prompt, "risky": r.risky} for r in red_team_prompts(world, "train")]))
    iterations = max(2, steps // 4)
    start = time.perf_counter()
    ppo_adapter = ppo(PPOConfig.model_validate({
        "out_dir": out / "ppo", "policy": merged, "reward": reward_dirs["helpful"],
        "safety_reward": reward_dirs["safety"], "prompts": prompts,
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "targets": "all-linear", "seed": seed},
        "ppo": {"iterations": iterations, "batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 2, "lr": PPO_LR,
                "max_new_tokens": 24, "init_kl_coef": PPO_KL, "target_kl": PPO_TARGET_KL, "save_every": iterations,
                "seed": seed}}))
    ppo_seconds = time.perf_counter() - start

    scorers = {kind: RewardScorer.load(path) for kind, path in reward_dirs.items()}
    sft = Session.load(merged)
    redrawn = redraw(world, prefs, out / "world" / "preferences-redrawn.jsonl", seed + 1)
    flaws, seen, fresh = (flaw_accuracy(path, scorers, sft) for path in (heldout, prefs, redrawn))
    models = {"SFT": merged, "SFT + DPO": dpo_adapter, "SFT + PPO": ppo_adapter}
    scores = {name: score(Session.load(path), world, scorers, seed) for name, path in models.items()}
    sampled = {name: sampled_reward(Session.load(models[name]), world, scorers, seed) for name in ("SFT", "SFT + PPO")}
    val = {kind: [json.loads(line) for line in (out / f"reward-{kind}" / "metrics.jsonl").read_text().splitlines()
                  if "val_accuracy" in line][-1]["val_accuracy"] for kind in reward_dirs}
    dpo_val = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()
               if "val_preference_accuracy" in line][-1]
    ppo_log = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    lines = [
        "## Alignment: reward models, DPO and PPO\n",
        f"Preference pairs about the training people ({sum(1 for _ in prefs.open())}): the true answer over another "
        "person's value or an evasive reply (*helpful*); a refusal over a phone-number leak on prompts asking for the "
        "private number, and the answer over a refusal on their harmless look-alikes (*safety*).\n",
        f"- Reward models (Bradley–Terry, trunk from the SFT model, {steps} steps each, {rm_seconds:.0f} s): pairwise "
        f"accuracy on held-out people's pairs **{val['helpful']:.0%}** (helpfulness) and **{val['safety']:.0%}** "
        "(safety). As in LLaMA-2, the score used is the safety model's on risky prompts (or where it is low), the "
        "helpfulness model's otherwise. By what is wrong with the rejected reply:\n",
        "| rejected reply (held-out people) | pairs | reward model ranks it lower | SFT model's likelihood ranks it "
        "lower |",
        "|---|---:|---:|---:|",
        *[f"| {FLAWS[flaw][1]} | {len(oks)} | {mean(oks):.0%} | {mean(likely):.0%} |"
          for flaw, (oks, likely) in flaws.items()],
        "",
        "A wrong value needs the person's fact, and the SFT model has it: its own likelihood ranks "
        f"{mean(flaws['wrong_value'][1]):.0%} of these pairs right. The reward model, trained from that model on a "
        f"few hundred pairs, ranks {mean(seen['wrong_value'][0]):.0%} of its training pairs' wrong values lower, "
        f"{mean(fresh['wrong_value'][0]):.0%} of new pairs drawn for the same people (questions and wrong "
        f"values drawn again) and {mean(flaws['wrong_value'][0]):.0%} of the held-out people's: it has learnt the "
        "pairs it was shown, not the facts behind them, nor to check a stated value against what pretraining "
        "stored.\n",
        f"- DPO on the helpfulness pairs (β {DPO_BETA}, LoRA, {steps} steps, {dpo_seconds:.0f} s): held-out "
        "preference accuracy "
        f"{dpo_val['val_reference_preference_accuracy']:.0%} (SFT) → **{dpo_val['val_preference_accuracy']:.0%}**.",
        f"- PPO against the combined reward (LoRA, {iterations} iterations of 32 rollouts, per-token KL penalty "
        f"β₀ {PPO_KL} adapted towards {PPO_TARGET_KL:g} nats per response, {ppo_seconds:.0f} s): training reward "
        f"{ppo_log[0]['reward']:.2f} → {ppo_log[-1]['reward']:.2f}, KL to the SFT model {ppo_log[-1]['kl']:.2f} "
        "nats per response. On held-out prompts, the mean reward of sampled replies (temperature 1, what PPO "
        f"optimises) goes {sampled['SFT']:.2f} (SFT) → **{sampled['SFT + PPO']:.2f}**; the table below scores "
        "greedy replies.\n",
        "![PPO reward and KL](ppo/reward.png)\n",
        "| model | mean reward (held-out) | exact match (held-out people) | refusal rate (red team) | "
        "false refusals (look-alikes) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, sc in scores.items():
        lines.append(f"| {name} | {sc.reward:.2f} | {sc.exact_match:.0%} | {sc.refusals.refusal_rate:.0%} | "
                     f"{sc.refusals.false_refusal_rate:.0%} |")
    lines += ["", "The refusals come from the safety demonstrations mixed into SFT. DPO on helpfulness preferences "
              "alone does not protect them. PPO is scored by the safety reward model on risky prompts, as LLaMA-2 "
              "does. It optimises whatever these small reward models reward: the helpfulness model cannot tell a "
              "right value from a wrong one, so there is little PPO can honestly gain over SFT on it, and replies "
              "that are neither a refusal nor a leak can score well (reward hacking) — compare the replies below.", "",
              "| red-team prompt (held-out person) | " + " | ".join(scores) + " |", "|---|" + "---|" * len(scores)]
    replies = [sc.refusals.replies for sc in scores.values()]
    for row in list(zip(*replies))[:6]:
        lines.append(f"| {row[0][0].prompt} | " + " | ".join(table_cell(reply, 40) for _, reply in row) + " |")
    print("[demo] alignment: refusal " + ", ".join(f"{n} {sc.refusals.refusal_rate:.0%}" for n, sc in scores.items())
          + "; reward " + ", ".join(f"{n} {sc.reward:.2f}" for n, sc in scores.items()))
    return Alignment("\n".join(lines) + "\n", models, scores, scorers)


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


def heldout_prompts(world: World, seed: int) -> tuple[list[list[dict]], torch.Tensor]:
    """The held-out people's questions and red-team prompts as chats, and which prompts are risky."""
    qs, red_team = questions(world, "heldout", seed=seed), red_team_prompts(world, "heldout")
    chats = [[{"role": "user", "content": q.question}] for q in qs] + \
            [[{"role": "user", "content": r.prompt}] for r in red_team]
    return chats, torch.tensor([False] * len(qs) + [r.risky for r in red_team])


def combined_score(scorers: dict[str, RewardScorer], chats: list[list[dict]], replies: list[str],
                   risky: torch.Tensor) -> float:
    helpful = torch.tensor(scorers["helpful"].score(chats, replies))
    safety = torch.tensor(scorers["safety"].score(chats, replies))
    return float(combined_reward(helpful, safety, risky).mean())


def sampled_reward(session: Session, world: World, scorers: dict[str, RewardScorer], seed: int,
                   samples: int = 4) -> float:
    """The mean combined reward of replies sampled at temperature 1 to the held-out prompts."""
    chats, risky = heldout_prompts(world, seed)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed,
                            stop_token_ids=session.greedy(1).stop_token_ids)
    replies = session.replies(chats * samples, params)
    return combined_score(scorers, chats * samples, replies, risky.repeat(samples))


def score(session: Session, world: World, scorers: dict[str, RewardScorer], seed: int) -> Scores:
    """Reward (LLaMA-2's combination), exact match and refusal rates on held-out prompts."""
    answers = exact_match(session, questions(world, "heldout", seed=seed))
    refusals = refusal_report(session, red_team_prompts(world, "heldout"))
    chats, risky = heldout_prompts(world, seed)
    replies = [a for a, _ in answers] + [r for _, r in refusals.replies]
    return Scores(combined_score(scorers, chats, replies, risky), mean(answers), refusals)
