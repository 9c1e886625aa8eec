"""`lmforge rejection-sample`: rejection-sampling fine-tuning, as LLaMA-2 describes it (Touvron et al.
2023, section 3.2.3).

Each round samples K responses per prompt from the current model (batched, seeded; with
`include_greedy`, its greedy response is a candidate too), scores them
with the reward model, keeps the best per prompt and fine-tunes the current model on the kept
responses through the SFT stage; the next round samples from the result. A round writes, under
`out_dir/round-N/`, every candidate with its score (`candidates.jsonl`), the kept responses as SFT
JSONL (`best.jsonl`) and the SFT run (`sft/`); `out_dir/rounds.jsonl` holds each round's mean best
score beside the mean score of all samples (the selection gain)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from lmforge.align.dpo import model_base
from lmforge.config import load_recipe
from lmforge.console import Progress
from lmforge.data.chat import Prompt, read_prompts
from lmforge.generate.sampling import SamplingParams, StochasticSampling
from lmforge.generate.session import Session
from lmforge.generate.text import complete, stop_token_ids
from lmforge.peft.adapters import is_adapter_dir, merge_and_save
from lmforge.peft.method import AdapterConfig
from lmforge.train.loop import TrainConfig
from lmforge.train.sft import DatasetSpec, SFTConfig, SFTDataConfig, sft
from lmforge.tokenizer import Message


class ResponseScorer(Protocol):
    """What rejection sampling needs from a reward model (`lmforge.align.reward.RewardScorer`)."""

    def score(self, prompts: list[list[Message]], responses: list[str], batch_size: int = 32) -> list[float]: ...


class SamplingConfig(StochasticSampling):
    """How the candidates are drawn: `SamplingParams` plus how many, in what batches, from what seed."""

    k: int = Field(4, gt=0, description="responses sampled per prompt")
    include_greedy: bool = Field(False, description="also score the model's greedy response, as the first "
                                                    "candidate: the kept response then scores at least as "
                                                    "well as what the model answers now")
    batch_size: int = Field(32, gt=0, description="sequences generated (and scored) together")
    seed: int = 0


class RoundData(SFTDataConfig):
    datasets: list[DatasetSpec] = Field(default_factory=list,
                                        description="SFT datasets mixed in beside each round's kept responses")


class RoundSFTConfig(BaseModel):
    """The SFT stage's settings for each round (its base and kept responses are set per round)."""

    model_config = ConfigDict(extra="forbid")

    data: RoundData = RoundData()
    adapter: AdapterConfig = AdapterConfig(method="lora")
    train: TrainConfig = TrainConfig(steps=100, lr=2e-4, warmup_steps=10, weight_decay=0.0, eval_every=50,
                                     save_every=100)


class RejectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    base: Path = Field(description="the model to start from: an HF directory, a LoRA adapter directory, or a Hub id")
    prompts: Path = Field(description="JSONL: {'prompt': text | messages}, preference pairs, or SFT records; or a Hub "
                                      "dataset hf:org/name[:config][@revision]")
    prompts_split: str = Field("train", description="the split of a Hub dataset prompts")
    reward: Path = Field(description="reward model directory or Hub id (RewardScorer.load)")
    rounds: int = Field(1, gt=0, description="sample, select and fine-tune this many times")
    sampling: SamplingConfig = SamplingConfig()
    sft: RoundSFTConfig = RoundSFTConfig()

    @model_validator(mode="after")
    def _check(self) -> RejectionConfig:
        if self.rounds > 1 and self.sft.adapter.method == "prompt":
            raise ValueError("sft.adapter.method prompt cannot be merged into the next round's model; use rounds=1")
        return self


# ---- prompts -------------------------------------------------------------------------------------


def encode_prompts(session: Session, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt ready for the reply; a prompt that fills the context is an error
    naming its file and line."""
    out = []
    for p in prompts:
        ids = session.tokenizer.encode_chat(p.messages)
        if len(ids) >= session.context:
            raise ValueError(f"{p.path}:{p.line}: field 'prompt': {len(ids)} tokens leave no room for a response in "
                             f"the model's context of {session.context} tokens")
        out.append(ids)
    return out


# ---- sampling and selection ----------------------------------------------------------------------


def sample_candidates(session: Session, prompts: Sequence[Sequence[int]], k: int, params: SamplingParams, *,
                      batch_size: int = 32) -> list[list[str]]:
    """`k` sampled responses (text, stripped) for each tokenized prompt, generated `batch_size`
    sequences at a time; batch b samples with seed `params.seed + 1_000_003 * b`."""
    rows = [p for p in prompts for _ in range(k)]
    texts: list[str] = []
    for b, start in enumerate(Progress(range(0, len(rows), batch_size), desc="sample", unit="batch", leave=False)):
        seed = None if params.seed is None else params.seed + 1_000_003 * b
        done = complete(session.engine, session.tokenizer, rows[start : start + batch_size],
                        params.model_copy(update={"seed": seed}))
        texts += [c.text.strip() for c in done]
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def best_of(scores: Sequence[Sequence[float]]) -> list[int]:
    """The index of the highest score of each prompt's candidates (the first on a tie)."""
    if any(not s for s in scores):
        raise ValueError("best_of: a prompt has no scored candidates")
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def score_candidates(scorer: ResponseScorer, prompts: Sequence[Prompt], candidates: list[list[str]],
                     batch_size: int) -> list[list[float]]:
    """The reward model's score of every candidate, grouped per prompt."""
    k = len(candidates[0])
    flat = scorer.score([p.messages for p in prompts for _ in range(k)], [c for cs in candidates for c in cs],
                        batch_size=batch_size)
    if len(flat) != len(prompts) * k:
        raise ValueError(f"the reward model returned {len(flat)} scores for {len(prompts) * k} responses")
    return [[float(s) for s in flat[i * k : (i + 1) * k]] for i in range(len(prompts))]


def write_round(out: Path, prompts: Sequence[Prompt], candidates: list[list[str]], scores: list[list[float]],
                best: list[int]) -> Path:
    """Write every candidate (`candidates.jsonl`) and the kept ones as SFT data (`best.jsonl`)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "candidates.jsonl").open("w", encoding="utf-8") as all_f, \
            (out / "best.jsonl").open("w", encoding="utf-8") as best_f:
        for p, texts, s, i in zip(prompts, candidates, scores, best, strict=True):
            record = {"prompt": p.messages, "responses": texts, "scores": s, "best": i}
            all_f.write(json.dumps(record, ensure_ascii=False) + "\n")
            kept = {"messages": [*p.messages, {"role": "assistant", "content": texts[i]}], "score": s[i],
                    "candidates": {"n": len(s), "mean": statistics.fmean(s), "min": min(s), "max": max(s)}}
            best_f.write(json.dumps(kept, ensure_ascii=False) + "\n")
    return out / "best.jsonl"


# ---- the stage -----------------------------------------------------------------------------------


def round_sft_config(config: RejectionConfig, round_dir: Path, base: Path, data: Path) -> SFTConfig:
    """The SFT stage's recipe for one round: fine-tune `base` on the kept responses `data`."""
    s = config.sft
    datasets = [DatasetSpec(path=data), *s.data.datasets]
    return SFTConfig(out_dir=round_dir / "sft", base=base, adapter=s.adapter, train=s.train,
                     data=SFTDataConfig(**{**s.data.model_dump(), "datasets": datasets}))


def sample_round(config: RejectionConfig, round_no: int, policy: Path, prompts: list[Prompt],
                 scorer: ResponseScorer) -> tuple[list[list[str]], list[list[float]]]:
    """Sample K candidates per prompt from `policy` and score them."""
    s = config.sampling
    session = Session.load(policy)
    params = s.stopping_at(stop_token_ids(session.model.config, session.tokenizer), seed=s.seed + round_no)
    encoded = encode_prompts(session, prompts)
    candidates = sample_candidates(session, encoded, s.k, params, batch_size=s.batch_size)
    if s.include_greedy:
        greedy = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=0.0, stop_token_ids=params.stop_token_ids)
        candidates = [[g, *c] for (g,), c in zip(sample_candidates(session, encoded, 1, greedy,
                                                                    batch_size=s.batch_size), candidates)]
    return candidates, score_candidates(scorer, prompts, candidates, s.batch_size)


def load_scorer(path: Path) -> ResponseScorer:
    from lmforge.align.reward import RewardScorer

    return RewardScorer.load(path)


def rejection_sample(config: RejectionConfig, *, scorer: ResponseScorer | None = None) -> Path:
    """Run the rounds; returns the last round's fine-tuned adapter or model directory. `scorer`
    stands in for the reward model at `config.reward`."""
    prompts = read_prompts(config.prompts, sft_records=True, split=config.prompts_split)
    scorer = scorer or load_scorer(config.reward)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    report = config.out_dir / "rounds.jsonl"
    report.write_text("")
    policy = model_base(config.base, config.out_dir)
    for round_no in range(1, config.rounds + 1):
        round_dir = config.out_dir / f"round-{round_no}"
        candidates, scores = sample_round(config, round_no, policy, prompts, scorer)
        best = best_of(scores)
        data = write_round(round_dir, prompts, candidates, scores, best)
        out = sft(round_sft_config(config, round_dir, policy, data))
        record = {"round": round_no, "policy": str(policy), "prompts": len(prompts), "samples": sum(map(len, scores)),
                  "mean_best_score": statistics.fmean(s[i] for s, i in zip(scores, best)),
                  "mean_score": statistics.fmean(x for s in scores for x in s), "data": str(data), "output": str(out)}
        record["selection_gain"] = record["mean_best_score"] - record["mean_score"]
        with report.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(f"round {round_no}: mean best score {record['mean_best_score']:.4f} vs mean score "
                   f"{record['mean_score']:.4f} over {record['samples']} samples (selection gain "
                   f"{record['selection_gain']:+.4f})")
        if round_no < config.rounds:
            policy = merge_and_save(out, round_dir / "model") if is_adapter_dir(out) else out
    return out


def load_rejection_config(path: str | Path, overrides: list[str]) -> RejectionConfig:
    return load_recipe(RejectionConfig, path, overrides)
