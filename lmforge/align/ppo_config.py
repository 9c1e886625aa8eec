"""The `lmforge ppo` recipe: what to train against (`PPOConfig`) and how (`PPOSettings`).

Option names follow TRL's `PPOConfig` where TRL has the option (`missing_eos_penalty`,
`whiten_rewards`, `use_score_scaling`, `use_score_norm`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmforge.generate.sampling import StochasticSampling
from lmforge.peft.method import AdapterConfig
from lmforge.train.loggers import LOGGERS_HELP, Loggers


class PPOSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(20, gt=0, description="rollout + update rounds")
    batch_size: int = Field(16, gt=0, description="prompts per rollout")
    mini_batch_size: int = Field(8, gt=0)
    ppo_epochs: int = Field(4, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    clip: float = Field(0.2, gt=0, description="policy ratio clip")
    value_clip: float = Field(0.2, gt=0)
    value_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    init_kl_coef: float = Field(0.05, ge=0, description="beta of the per-token KL penalty")
    adaptive_kl: bool = True
    target_kl: float = Field(1.0, gt=0, description="per-response KL the adaptive controller aims at")
    kl_horizon: int = Field(1000, gt=0)
    min_kl_coef: float = Field(1e-3, gt=0, description="the adaptive controller keeps beta at or above this, so a "
                                                       "run below its target KL cannot switch the penalty off")
    max_kl_coef: float = Field(1.0, gt=0, description="the adaptive controller keeps beta at or below this, so a "
                                                      "run above its target KL cannot let the penalty swamp the score")
    sampling: StochasticSampling = Field(StochasticSampling(max_new_tokens=32),
                                         description="how rollouts are sampled (their seed follows from `seed`)")
    missing_eos_penalty: float = Field(0.0, ge=0, description="subtracted from the score of a response cut at "
                                                             "max_new_tokens, before any score normalisation "
                                                             "(TRL's option of the same name)")
    whiten_scores: bool = Field(False, description="LLaMA-2's WHITEN(LOGIT(R_c)): each rollout's scores whitened to "
                                                   "zero mean and unit variance (the reward model's scores are its "
                                                   "linear head's outputs, the logits, so LOGIT is the identity)")
    use_score_scaling: bool = Field(False, description="divide each score by the standard deviation of every score "
                                                       "seen so far (running over iterations, kept in checkpoints; "
                                                       "TRL's option of the same name)")
    use_score_norm: bool = Field(False, description="with use_score_scaling: also subtract the running mean "
                                                    "(TRL's option of the same name)")
    whiten_rewards: bool = Field(False, description="whiten the per-token rewards (score + KL penalty) over the "
                                                    "rollout's response tokens to unit variance, mean kept, before "
                                                    "GAE (TRL's option of the same name)")
    whiten_advantages: bool = True
    estimator: Literal["gae", "grpo"] = Field("gae", description="advantages from a value head (PPO) or "
                                                                 "relative to a group of samples (GRPO)")
    group_size: int = Field(4, gt=1, description="GRPO: samples per prompt")
    eval_every: int = Field(5, gt=0, description="iterations between evaluations on `eval_prompts` (and after the "
                                                 "last)")
    save_every: int = Field(5, gt=0)
    keep_last: int = Field(2, gt=0)
    seed: int = 0
    loggers: Loggers = Field(["jsonl"], description=LOGGERS_HELP)

    @model_validator(mode="after")
    def _check(self) -> PPOSettings:
        if self.min_kl_coef > self.max_kl_coef:
            raise ValueError(f"min_kl_coef {self.min_kl_coef} is above max_kl_coef {self.max_kl_coef}")
        if self.adaptive_kl and not self.min_kl_coef <= self.init_kl_coef <= self.max_kl_coef:
            raise ValueError(f"init_kl_coef {self.init_kl_coef} is outside the adaptive controller's range "
                             f"[min_kl_coef {self.min_kl_coef}, max_kl_coef {self.max_kl_coef}]; widen the range, "
                             "or set adaptive_kl false for a fixed coefficient")
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError("use_score_norm subtracts the running mean of use_score_scaling; set both")
        if self.whiten_scores and self.use_score_scaling:
            raise ValueError("whiten_scores and use_score_scaling are alternatives (whitening a rollout's scores "
                             "undoes any running scaling); choose one")
        if self.whiten_rewards and self.estimator == "grpo":
            raise ValueError("whiten_rewards whitens the per-token rewards of GAE; estimator grpo has none")
        return self


class PPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    policy: Path = Field(description="the SFT model: an HF directory or Hub id (merge an adapter into its base first)")
    reward: Path = Field(description="reward model directory or Hub id (sequence-classification layout)")
    safety_reward: Path | None = Field(None, description="a safety reward model, combined as LLaMA-2 does")
    safety_threshold: float = 0.15
    prompts: Path = Field(description="JSONL of prompts: {'prompt': text | messages, 'risky': bool (optional)}, "
                                      "or a Hub dataset hf:org/name[:config][@revision]")
    prompts_split: str = Field("train", description="the split of a Hub dataset prompts")
    eval_prompts: Path | None = Field(None, description="held-out prompts in the same JSONL, scored every "
                                                        "ppo.eval_every iterations: eval_reward_sampled, "
                                                        "eval_reward_greedy, eval_kl")
    eval_prompts_split: str = Field("test", description="the split of a Hub dataset eval_prompts")
    adapter: AdapterConfig = AdapterConfig(method="lora")
    ppo: PPOSettings = PPOSettings()
