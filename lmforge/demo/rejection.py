"""The demo's rejection-sampling fine-tuning, LLaMA-2's first RLHF stage: K replies sampled per training prompt
from the SFT model beside its greedy reply, the best by the combined reward (the safety model's score on risky
prompts, LLaMA-2's combination) kept, and the SFT model fine-tuned on them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.align.rejection import RejectionConfig, RoundData, RoundSFTConfig, SamplingConfig, rejection_sample
from lmforge.align.reward import RewardScorer, combined_reward
from lmforge.data.chat import Message
from lmforge.peft.method import AdapterConfig
from lmforge.train.loop import TrainConfig
from lmforge.train.sft import DatasetSpec

SAMPLES = 4  # K replies per prompt
TEMPERATURE, TOP_P = 1.0, 0.95  # below 1 the SFT model's K samples were mostly one reply (no choice to make)
# The SFT data replayed beside the kept replies (which weigh 1), so that one round on the prompts of the
# preference data does not wear off what SFT taught on the rest.
REPLAY = {"sft.jsonl": 0.5, "safety-sft.jsonl": 0.15}


@dataclass
class CombinedScorer:
    """Rejection sampling's scorer: LLaMA-2's combination of the helpfulness and safety reward models."""

    scorers: dict[str, RewardScorer]  # "helpful", "safety"
    risky: set[str]  # the risky prompts' texts

    def score(self, prompts: list[list[Message]], responses: list[str], batch_size: int = 32) -> list[float]:
        helpful, safety = (torch.tensor(self.scorers[kind].score(prompts, responses, batch_size))
                           for kind in ("helpful", "safety"))
        risky = torch.tensor([p[-1]["content"] in self.risky for p in prompts])
        return combined_reward(helpful, safety, risky).tolist()


def rejection_stage(out: Path, sft: Path, prompts: Path, scorers: dict[str, RewardScorer], reward: Path, steps: int,
                    seed: int, max_new_tokens: int) -> tuple[Path, dict[str, Any]]:
    """One round of best-of-`SAMPLES` sampling on `prompts` (JSONL with `risky` flags) and LoRA fine-tuning of
    the SFT model on the kept replies, with the SFT data (`out/world/`) replayed, for `steps`; the adapter and
    the round's record (mean best score, mean score, selection gain)."""
    risky = {record["prompt"] for record in map(json.loads, prompts.read_text().splitlines()) if record.get("risky")}
    config = RejectionConfig(
        out_dir=out / "rejection", base=sft, prompts=prompts, reward=reward, rounds=1,
        sampling=SamplingConfig(k=SAMPLES, include_greedy=True, max_new_tokens=max_new_tokens,
                                temperature=TEMPERATURE, top_p=TOP_P, seed=seed),
        sft=RoundSFTConfig(data=RoundData(datasets=[DatasetSpec(path=out / "world" / name, weight=weight)
                                                    for name, weight in REPLAY.items()], val_fraction=0.05, max_len=96),
                           adapter=AdapterConfig(method="lora", r=16, alpha=32, targets="all-linear", seed=seed),
                           train=TrainConfig(steps=steps, micro_batch_size=16, lr=1e-3, warmup_steps=10,
                                             weight_decay=0.0, log_every=10, eval_every=steps, save_every=steps,
                                             seed=seed)))
    adapter = rejection_sample(config, scorer=CombinedScorer(scorers, risky))
    return adapter, json.loads((out / "rejection" / "rounds.jsonl").read_text().splitlines()[-1])
