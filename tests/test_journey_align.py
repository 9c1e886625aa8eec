"""Journey 5, Align, through the command line alone with the README's recipes: preference JSONL →
`lmforge reward` → `lmforge ppo` (reward rises, KL bounded, in its report), `lmforge dpo` and
`lmforge rejection-sample`, each from the same chat model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_data import write_jsonl

from lmforge.align.reward import RewardScorer
from lmforge.cli import main
from lmforge.world.documents import questions
from lmforge.world.people import make_world
from lmforge.world.preferences import write_preference_data
from lmforge.world.safety import red_team_prompts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_align_journey(tmp_path, sharp_base):
    world = make_world(0, n_people=20, n_companies=4)
    pairs = write_preference_data(world, tmp_path / "pairs.jsonl", "train")
    heldout = write_preference_data(world, tmp_path / "pairs-heldout.jsonl", "heldout")
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": q.question} for q in questions(world, "train")[:48]] +
                          [{"prompt": r.prompt, "risky": r.risky} for r in red_team_prompts(world, "train")])
    train = ["train.log_every=5", "train.save_every=1000"]

    rm = tmp_path / "reward"
    assert main(["reward", "--config", str(CONFIGS / "reward-tiny.yaml"), f"base={sharp_base}", f"out_dir={rm}",
                 f"data.train_path={pairs}", f"data.val_path={heldout}", "data.max_len=128", "train.steps=30",
                 "train.lr=1e-3", "train.eval_every=30", *train]) == 0
    # refusals over leaks and over garbled text need no knowledge of the people (nor reading the prompt)
    scorer = RewardScorer.load(rm / "model")
    plain = [p for p in records(heldout) if p["flaw"] in ("leak", "garbled")]
    chosen, rejected = (scorer.score([p["prompt"] for p in plain], [p[key][0]["content"] for p in plain])
                        for key in ("chosen", "rejected"))
    print("refusal ranked higher:", [(p["flaw"], c > r) for p, c, r in zip(plain, chosen, rejected)])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(plain) >= 0.9

    ppo = tmp_path / "ppo"
    assert main(["ppo", "--config", str(CONFIGS / "ppo-tiny.yaml"), f"policy={sharp_base}", f"reward={rm / 'model'}",
                 f"safety_reward={rm / 'model'}", f"prompts={prompts}", f"out_dir={ppo}", "ppo.iterations=32",
                 "ppo.sampling.max_new_tokens=4", "ppo.save_every=32", "ppo.lr=1e-3", "ppo.init_kl_coef=0.02"]) == 0
    log = records(ppo / "metrics.jsonl")
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (log[:8], log[-8:]))
    print(f"PPO reward {first:.3f} (first 8 iterations) -> {last:.3f} (last 8); KL {[round(r['kl'], 2) for r in log]}")
    assert last > first + 0.1
    assert max(r["kl"] for r in log) < 2  # twice target_kl: the adaptive controller's bound
    report = (ppo / "report.md").read_text()
    assert f"reward {log[-1]['reward']:.4g}" in report and (ppo / "reward.png").stat().st_size > 1000

    dpo = tmp_path / "dpo"
    assert main(["dpo", "--config", str(CONFIGS / "dpo-tiny.yaml"), f"base={sharp_base}", f"out_dir={dpo}",
                 f"data.train_path={pairs}", f"data.val_path={heldout}", "data.max_len=128", "beta=0.05",
                 "train.steps=60", "train.lr=1e-2", "train.eval_every=60", *train]) == 0
    val = [r for r in records(dpo / "metrics.jsonl") if "val_preference_accuracy" in r][-1]
    print(f"DPO held-out preference accuracy {val['val_reference_preference_accuracy']:.2f} -> "
          f"{val['val_preference_accuracy']:.2f}")
    assert val["val_preference_accuracy"] > val["val_reference_preference_accuracy"]
    assert (dpo / "adapter" / "adapter_config.json").is_file()

    rs = tmp_path / "rejection"
    assert main(["rejection-sample", "--config", str(CONFIGS / "rejection-tiny.yaml"), f"base={sharp_base}",
                 f"out_dir={rs}", f"prompts={prompts}", f"reward={rm / 'model'}", "sampling.max_new_tokens=8",
                 "sft.train.steps=20", "sft.train.save_every=20", "sft.data.max_len=128"]) == 0
    rounds = records(rs / "rounds.jsonl")
    print("rejection sampling mean score by round: " + ", ".join(f"{r['mean_score']:.3f}" for r in rounds))
    assert len(rounds) == 2 and rounds[1]["mean_score"] > rounds[0]["mean_score"]
