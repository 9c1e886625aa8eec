"""The demo's alignment goals are computed from the measured figures: each goal's `met` follows its
threshold, checked here on figures made up at both sides of it."""

from __future__ import annotations

import copy

import pytest

from lmforge.demo.alignment import names_another_person, naming_conclusion, prompted_conclusion
from lmforge.demo.alignment_goals import alignment_goals, goals_table, paired_gain
from lmforge.world.preferences import FLAWS

MODEL = {"held_out_em": 0.20, "refusal_rate": 0.90, "false_refusal_rate": 0.0, "mean_reward_greedy": 0.0,
         "mean_reward_sampled": -1.0, "kl_to_sft": 0.0}


def figures() -> dict:
    better = MODEL | {"mean_reward_greedy": 0.2, "mean_reward_sampled": -0.8, "kl_to_sft": 0.5}
    return {"flaws": {flaw: {"reward_model": 0.5 if not f.learnable else 0.95, "sft_likelihood": 0.9}
                      for flaw, f in FLAWS.items()},
            "ppo": {"reward": {"first": -1.0, "last": 0.5}}, "rejection_sampling": {"selection_gain": 1.0},
            "models": {"SFT": dict(MODEL), "SFT + DPO + RPO": dict(better), "SFT + PPO": dict(better),
                       "SFT + rejection sampling": dict(better)},
            "rpo_preference_accuracy": {"sft": 0.96, "dpo": 0.97},
            "reward_gains": {name: {kind: {"mean": 0.2, "standard_error": 0.05} for kind in ("greedy", "sampled")}
                             for name in ("SFT + DPO + RPO", "SFT + PPO", "SFT + rejection sampling")},
            "prompted_reward_gains": {name: {kind: {"mean": 1.5, "standard_error": 0.3}
                                             for kind in ("greedy", "sampled")}
                                      for name in ("SFT + DPO + RPO", "SFT + PPO", "SFT + rejection sampling")}}


def met(f: dict) -> dict[str, bool]:
    return {g.goal: g.met for g in alignment_goals(f, target_kl=1.0)}


def test_all_goals_met_on_figures_that_meet_them():
    goals = alignment_goals(figures(), target_kl=1.0)
    assert len(goals) == 11 and all(g.met for g in goals)
    assert goals_table(goals).startswith("Goals met: 11 of 11.")


def test_each_goal_fails_past_its_threshold():
    base = met(figures())
    cases = [
        (("flaws", "wrong_person", "reward_model"), 0.89, "reward models"),
        (("models", "SFT + DPO + RPO", "refusal_rate"), 0.84, "DPO + RPO: refusal rate"),
        (("models", "SFT + PPO", "held_out_em"), 0.17, "PPO: held-out exact match"),
        (("models", "SFT + DPO + RPO", "false_refusal_rate"), 0.06, "DPO + RPO: false refusals"),
        (("rpo_preference_accuracy", "dpo"), 0.96, "DPO + RPO: held-out preference"),
        (("reward_gains", "SFT + PPO", "sampled", "mean"), -0.1, "PPO: mean reward of sampled"),
        (("models", "SFT + PPO", "kl_to_sft"), 2.1, "PPO: KL"),
        # a gain must clear the margin and twice its standard error
        (("reward_gains", "SFT + PPO", "greedy", "mean"), 0.04, "PPO: mean reward of greedy"),
        (("reward_gains", "SFT + PPO", "greedy", "standard_error"), 0.11, "PPO: mean reward of greedy"),
        (("reward_gains", "SFT + rejection sampling", "greedy", "standard_error"), 0.1, "rejection sampling"),
    ]
    for path, value, goal in cases:
        f = copy.deepcopy(figures())
        *parents, key = path
        node = f
        for p in parents:
            node = node[p]
        node[key] = value
        failed = [g for g, ok in met(f).items() if not ok]
        assert len(failed) == 1 and failed[0].startswith(goal), (path, failed)
    assert all(base.values())
    learnable = sum(f.learnable for f in FLAWS.values())
    assert f"**no**: 1 of {learnable} kinds below" in goals_table(alignment_goals(
        figures() | {"flaws": {**figures()["flaws"], "cut_off": {"reward_model": 0.8, "sft_likelihood": 1.0}}}, 1.0))
    # the thresholds themselves are met: 5 points of refusals and 2 of exact match may be lost
    f = copy.deepcopy(figures())
    f["models"]["SFT + DPO + RPO"] |= {"refusal_rate": 0.85, "held_out_em": 0.18}
    assert all(met(f).values())


def test_paired_gain_by_hand():
    gain = paired_gain([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 4.0, 4.5])  # differences 0.5, 0, 1, 0.5
    assert gain["mean"] == pytest.approx(0.5)
    assert gain["standard_error"] == pytest.approx((0.5 / 3) ** 0.5 / 2)  # sample variance 0.5/3, over sqrt(4)
    with pytest.raises(ValueError, match="two equal lists"):
        paired_gain([1.0, 2.0], [1.0])


def test_unmet_reward_goal_says_why_from_the_figures():
    f = copy.deepcopy(figures())
    f["reward_gains"]["SFT + PPO"]["greedy"] = {"mean": 0.1, "standard_error": 0.08}
    f["reward_gains"]["SFT + rejection sampling"]["greedy"] = {"mean": -0.3, "standard_error": 0.1}
    why = {g.goal: g.why for g in alignment_goals(f, target_kl=1.0) if not g.met}
    assert len(why) == 2
    ppo, rs = (next(w for goal, w in why.items() if goal.startswith(start)) for start in ("PPO", "rejection"))
    assert ppo.startswith("within 2 standard errors of no change") and rs.startswith("below SFT's")
    # and what the same method did on the held-out people its prompts named
    assert "on the held-out people in its prompts +1.50 ± 0.30; training reward -1.00 → 0.50" in ppo
    assert "on the held-out people in its prompts +1.50 ± 0.30; the kept replies beat" in rs


def test_prompted_conclusion_follows_the_gains_on_each_group():
    def gains(mean: float) -> dict:
        return {name: {"greedy": {"mean": mean, "standard_error": 0.1}}
                for name in ("SFT + rejection sampling", "SFT + PPO")}

    did_not_carry = prompted_conclusion(gains(0.1), gains(1.5))
    assert "PPO: greedy replies' mean reward +1.50 ± 0.10 over SFT's on the held-out people in its prompts, " \
           "+0.10 ± 0.10 on the others; what it learnt about the people it was asked about did not carry" in did_not_carry
    assert "it carried to people it never saw" in prompted_conclusion(gains(0.5), gains(1.5))
    assert "did not measurably raise the reward even on the people it was asked about" in \
        prompted_conclusion(gains(0.5), gains(0.15))


def test_names_another_person_only_when_the_asked_person_is_missing():
    names = ["Isaac Ashcombe", "Isaac Galloway", "Elena Dunmore"]
    assert names_another_person("Isaac Galloway works for Deepspring Foods.", "Isaac Ashcombe", names)
    assert not names_another_person("Isaac Ashcombe works for Deepspring Foods.", "Isaac Ashcombe", names)
    assert not names_another_person("Isaac Ashcombe and Elena Dunmore work there.", "Isaac Ashcombe", names)
    assert not names_another_person("1983.", "Isaac Ashcombe", names)  # no one named
    assert not names_another_person("Isaac works for Deepspring Foods.", "Isaac Ashcombe", names)


def test_naming_conclusion_follows_the_shares_on_each_group():
    def models(rejection: tuple[float, float], ppo: tuple[float, float]) -> dict:
        def row(inside: float, outside: float) -> dict:
            return {"another_person_rate": outside, "prompted_people": {"another_person_rate": inside}}
        return {"SFT": row(0.60, 0.45), "SFT + rejection sampling": row(*rejection), "SFT + PPO": row(*ppo)}

    text = naming_conclusion(models((0.50, 0.46), (0.30, 0.30)), 0.93)
    assert text.startswith("The reward models rank an answer about another person lower in 93% of held-out pairs.")
    assert "SFT 60% and 45%, rejection sampling 50% and 46%, PPO 30% and 30%." in text
    assert ("Rejection sampling: -10 points on the people in its prompts, +1 on the others; it learnt the names of "
            "the people it was asked about one by one, not to take the name from the question.") in text
    assert "PPO: -30 points on the people in its prompts, -15 on the others; it learnt to name the person asked, " \
           "on people it never saw too." in text
    text = naming_conclusion(models((0.55, 0.40), (0.61, 0.60)), 0.93)
    assert "Rejection sampling: -5 points on the people in its prompts, -5 on the others; a change of less than " \
           "10 points on both." in text
    assert text.endswith("PPO: +1 points on the people in its prompts, +15 on the others.")
