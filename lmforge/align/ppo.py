"""`lmforge ppo`: RLHF with PPO, as InstructGPT and LLaMA-2 describe it.

Each iteration: sample responses to a batch of prompts with the generation engine (the rollout);
score each prompt + response with the reward model (a response cut at the token limit closed with
the chat template's end-of-turn marker, where the reward model reads its score, and less
`missing_eos_penalty`); optionally normalise the scores (LLaMA-2's whitening per rollout, or TRL's
running mean and standard deviation); give every response token the reward -beta * KL(policy ||
reference) and add the score at its last token; estimate advantages with GAE from a value head on
the policy's trunk, whiten them, and update policy and value head for several epochs of
minibatches with the clipped surrogate and clipped value losses.
beta adapts so that the KL tracks a target (Ziegler et al. 2019), within [min_kl_coef, max_kl_coef].
With `eval_prompts`, held-out prompts are scored every `eval_every` iterations.

`estimator: grpo` swaps the value model for GRPO's group-relative advantages (Shao et al. 2024):
each prompt is sampled `group_size` times, a response's advantage is its score against its group's
mean and spread, and the KL to the reference enters the loss (k3 estimate, weight beta) instead of
the reward. Everything else (rollouts, clipping, the KL controller, checkpoints) is shared.

The policy is the SFT model with LoRA adapters; the frozen reference is the same model with its
adapters disabled, so no second copy of the weights is held. The run directory is the training
loop's (`lmforge.train.run_dir`): metrics logged per iteration as `step` (to the trackers of
`ppo.loggers` too), and checkpoints at iteration boundaries (adapter, value head, optimizer, KL
coefficient, running score statistics, random state) that resume to the uninterrupted result."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lmforge.align.losses import (
    AdaptiveKLController, RunningMoments, gae, group_advantages, kl_k3, kl_penalty, masked_mean, ppo_policy_loss,
    ppo_value_loss, token_logprobs, whiten,
)
from lmforge.align.ppo_config import PPOConfig
from lmforge.align.reward import RewardScorer, combined_reward, turn_end_id
from lmforge.checkpoint import load_model
from lmforge.config import load_recipe
from lmforge.console import Progress
from lmforge.data.chat import Prompt, padding_id, read_prompts
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.text import stop_token_ids
from lmforge.peft.adapters import is_adapter_dir, save_adapter
from lmforge.peft.lora import disable_adapters
from lmforge.peft.method import AdapterConfig, apply_method
from lmforge.tokenizer import Tokenizer
from lmforge.train.optim import build_optimizer, clip_gradients
from lmforge.train.run_dir import STATE_FILE, RunDir


class Scorer(Protocol):
    """What PPO needs from a reward model: a score per tokenized prompt + response."""

    def score_ids(self, sequences: list[list[int]]) -> Tensor: ...


class ValueHead(nn.Module):
    """A scalar estimate of the return from each position's hidden state (initialised to zero)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 1, bias=True)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden.float()).squeeze(-1)


@dataclass
class Replies:
    """Prompts + generated responses, right-padded (B, T), with what the generating passes gave:
    position t of the (B, T-1) tensors scores token t+1 of `ids`; `mask` marks response tokens;
    `cut` marks responses that reached max_new_tokens without a stop token."""

    sequences: list[list[int]]
    responses: list[list[int]]
    ids: Tensor
    mask: Tensor
    logprobs: Tensor
    values: Tensor
    cut: Tensor


@dataclass
class Rollout:
    """One batch of prompt + response sequences, right-padded, with per-token training targets.
    Position t of the (B, T-1) tensors scores token t+1 of `ids`; `mask` marks response tokens."""

    ids: Tensor
    mask: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    stats: dict[str, float]
    samples: list[tuple[str, str, float]]


def policy_outputs(policy: nn.Module, head: ValueHead, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs of each next token (B, T-1), values (B, T-1) and logits (B, T-1, V)."""
    hidden = policy.model(ids)
    logits = policy.lm_head(hidden[:, :-1])
    return token_logprobs(logits, ids[:, 1:]), head(hidden[:, :-1]), logits


PPO_PANELS = {"reward-model score": ("reward",), "KL to the reference per response": ("kl", "kl_k3", "eval_kl"),
              "policy loss": ("policy_loss",)}
EVAL_PANEL = {"held-out reward-model score": ("eval_reward_sampled", "eval_reward_greedy")}


class PPOTrainer:
    """PPO (or GRPO) on `prompts`: rollouts scored by `scorer` (and `safety`), updates of the
    policy's adapters and the value head, logged and checkpointed into `config.out_dir`."""

    def __init__(self, config: PPOConfig, policy: nn.Module, tokenizer: Tokenizer, scorer: Scorer,
                 prompts: list[Prompt], *, safety: Scorer | None = None, eval_prompts: Sequence[Prompt] = ()) -> None:
        self.config, self.settings = config, config.ppo
        self.policy, self.tokenizer, self.scorer, self.safety, self.prompts = policy, tokenizer, scorer, safety, prompts
        self.head = ValueHead(policy.config.hidden_size)
        trainable = nn.ModuleList([policy, self.head])
        self.optimizer = build_optimizer(trainable, lr=self.settings.lr, weight_decay=self.settings.weight_decay,
                                         betas=(0.9, 0.95), eps=1e-8)
        self.kl = AdaptiveKLController(self.settings.init_kl_coef, self.settings.target_kl, self.settings.kl_horizon,
                                       bounds=(self.settings.min_kl_coef, self.settings.max_kl_coef))
        self.score_moments = RunningMoments()
        self.engine = Engine(policy)
        self.stop_ids = stop_token_ids(policy.config, tokenizer)
        self.turn_end = turn_end_id(tokenizer)
        self.prompt_ids = [tokenizer.encode_chat(p.messages) for p in prompts]
        self.eval_prompts = list(eval_prompts)
        self.eval_ids = [tokenizer.encode_chat(p.messages) for p in self.eval_prompts]
        self.iteration = 0
        self.run_dir = RunDir(config.out_dir)

    # ---- rollout -------------------------------------------------------------------------------

    def batch_indices(self) -> list[int]:
        """The prompts of this iteration: a seeded permutation, epoch after epoch (with GRPO, each
        prompt `group_size` times in a row)."""
        n, b = len(self.prompts), self.settings.batch_size
        start = self.iteration * b
        epoch_order: dict[int, list[int]] = {}
        out = []
        for k in range(start, start + b):
            epoch = k // n
            if epoch not in epoch_order:
                epoch_order[epoch] = random.Random(self.settings.seed + epoch).sample(range(n), n)
            out.append(epoch_order[epoch][k % n])
        if self.settings.estimator == "grpo":
            return [i for i in out for _ in range(self.settings.group_size)]
        return out

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], Tensor, Tensor]:
        """Sample responses with the engine and keep, for every sampled token, the policy's log-prob of
        it and the value estimate at its position, read from the forward passes that generated it (the
        lm_head's input and output), so no second policy forward is needed after generation.
        Returns the responses and (B, steps) log-probs and values, meaningful where a row was live."""
        captured: list[tuple[Tensor, Tensor]] = []
        hook = self.policy.lm_head.register_forward_hook(
            lambda module, args, output: captured.append((args[0][:, -1], output[:, -1])))
        responses: list[list[int]] = [[] for _ in prompts]
        step_logprobs, step_values = [], []
        try:
            for step in self.engine.stream(prompts, params):
                hidden, logits = captured.pop()
                tokens = torch.tensor([0 if token is None else token for token in step])
                step_logprobs.append(token_logprobs(logits, tokens))
                step_values.append(self.head(hidden))
                for row, token in enumerate(step):
                    if token is not None:
                        responses[row].append(token)
        finally:
            hook.remove()
        return responses, torch.stack(step_logprobs, 1), torch.stack(step_values, 1)

    @torch.no_grad()
    def reference_logprobs(self, ids: Tensor) -> Tensor:
        """The frozen reference's (the policy with its adapters disabled) log-probs (B, T-1) of each
        next token of finished sequences: one teacher-forced pass, like the reward model's."""
        with disable_adapters(self.policy):
            return token_logprobs(self.policy(ids[:, :-1]), ids[:, 1:])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Replies:
        """Responses to tokenized `prompts` (see `sample`), laid out for teacher-forced passes."""
        responses, sampled_logprobs, sampled_values = self.sample(prompts, params)
        sequences = [p + r for p, r in zip(prompts, responses)]
        longest = max(map(len, sequences))
        ids = torch.full((len(sequences), longest), padding_id(self.tokenizer), dtype=torch.long)
        mask = torch.zeros(len(sequences), longest - 1)
        logprobs, values = torch.zeros(len(sequences), longest - 1), torch.zeros(len(sequences), longest - 1)
        for row, (p, seq) in enumerate(zip(prompts, sequences)):
            ids[row, : len(seq)] = torch.tensor(seq)
            response = slice(len(p) - 1, len(seq) - 1)  # positions predicting response tokens
            mask[row, response] = 1
            logprobs[row, response] = sampled_logprobs[row, : len(seq) - len(p)]
            values[row, response] = sampled_values[row, : len(seq) - len(p)]
        cut = torch.tensor([seq[-1] not in self.stop_ids for seq in sequences])
        return Replies(sequences, responses, ids, mask, logprobs, values, cut)

    @torch.no_grad()
    def score(self, replies: Replies, risky: Tensor) -> Tensor:
        """The reward model's scores (N,) of `replies`, combined with the safety model's as LLaMA-2 does
        where there is one (`risky` flags the prompts it scores). A response cut at max_new_tokens is
        scored closed with the end-of-turn marker, the token the reward model was trained to read its
        score at (OpenRLHF does the same)."""
        closed = [seq + [self.turn_end] if c else seq for seq, c in zip(replies.sequences, replies.cut.tolist())]
        scores = self.scorer.score_ids(closed).float()
        if self.safety is None:
            return scores
        return combined_reward(scores, self.safety.score_ids(closed).float(), risky, self.config.safety_threshold)

    def normalise(self, scores: Tensor) -> Tensor:
        """The scores as PPO optimises them: whitened over the rollout (`whiten_scores`), divided by the
        running standard deviation, less the running mean with `use_score_norm` (`use_score_scaling`,
        statistics updated with these scores first, as TRL does), or as they are."""
        s = self.settings
        if s.whiten_scores:
            return whiten(scores, torch.ones_like(scores))
        if s.use_score_scaling:
            self.score_moments.update(scores)
            return (scores - (self.score_moments.mean if s.use_score_norm else 0.0)) / self.score_moments.std
        return scores

    @torch.no_grad()
    def rollout(self, indices: Sequence[int]) -> Rollout:
        """Sample, score and reward responses to the prompts `indices`, with their advantages and returns."""
        s = self.settings
        self.policy.eval()
        prompts = [self.prompt_ids[i] for i in indices]
        params = s.sampling.stopping_at(self.stop_ids, seed=s.seed * 1_000_003 + self.iteration)
        replies = self.generate(prompts, params)
        ids, mask, logprobs, values = replies.ids, replies.mask, replies.logprobs, replies.values
        scores = self.score(replies, torch.tensor([self.prompts[i].risky for i in indices]))
        scores = scores - s.missing_eos_penalty * replies.cut
        shaped = self.normalise(scores)
        ref_logprobs = self.reference_logprobs(ids)
        kl = kl_penalty(logprobs, ref_logprobs) * mask
        if s.estimator == "grpo":
            advantages, returns = group_advantages(shaped, s.group_size)[:, None] * mask, torch.zeros_like(mask)
        else:
            rewards = -self.kl.beta * kl
            last = mask.cumsum(1).argmax(1)  # the position predicting each response's last token
            rewards[torch.arange(len(ids)), last] += shaped
            if s.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
            if s.whiten_advantages:
                advantages = whiten(advantages, mask) * mask
        # k1 (the penalty's estimate) is unbiased but can come out below 0; k3 is never negative
        stats = {"reward": float(scores.mean()), "kl": float(kl.sum(1).mean()),
                 "kl_k3": float((kl_k3(logprobs, ref_logprobs) * mask).sum(1).mean()), "beta": self.kl.beta,
                 "response_length": float(mask.sum(1).mean())}
        samples = [(self.tokenizer.decode(p, skip_special_tokens=True),
                    self.tokenizer.decode(r, skip_special_tokens=True), float(sc))
                   for p, r, sc in list(zip(prompts, replies.responses, scores))[:3]]
        return Rollout(ids, mask, logprobs, ref_logprobs, values, advantages, returns, stats, samples)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics on `eval_prompts`: the mean score (the reward model's, combined with the
        safety model's, without the training-only missing-EOS penalty and normalisation) of replies
        sampled as rollouts are, with one seed at every evaluation so that changes come from the
        policy, and of greedy replies; and the KL to the reference per sampled reply (k1, nats)."""
        s = self.settings
        self.policy.eval()
        sampled_params = s.sampling.stopping_at(self.stop_ids, seed=s.seed)
        greedy_params = sampled_params.model_copy(update={"temperature": 0.0, "seed": None})
        totals = dict.fromkeys(("eval_reward_sampled", "eval_reward_greedy", "eval_kl"), 0.0)
        for start in range(0, len(self.eval_ids), s.batch_size):
            prompts = self.eval_ids[start : start + s.batch_size]
            risky = torch.tensor([p.risky for p in self.eval_prompts[start : start + s.batch_size]])
            sampled, greedy = self.generate(prompts, sampled_params), self.generate(prompts, greedy_params)
            kl = kl_penalty(sampled.logprobs, self.reference_logprobs(sampled.ids)) * sampled.mask
            totals["eval_reward_sampled"] += float(self.score(sampled, risky).sum())
            totals["eval_reward_greedy"] += float(self.score(greedy, risky).sum())
            totals["eval_kl"] += float(kl.sum())
        return {key: total / len(self.eval_ids) for key, total in totals.items()}

    # ---- update --------------------------------------------------------------------------------

    def update(self, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of minibatch updates over `rollout`; returns the mean of each loss term,
        the clipped fraction and the entropy over the updates."""
        s = self.settings
        self.policy.train()
        totals: dict[str, float] = {}
        updates = 0
        generator = torch.Generator().manual_seed(s.seed + self.iteration)
        params = self.optimizer.param_groups[0]["params"] + self.optimizer.param_groups[1]["params"]
        for _ in range(s.ppo_epochs):
            order = torch.randperm(len(rollout.ids), generator=generator)
            for start in range(0, len(order), s.mini_batch_size):
                loss, terms = self.minibatch_loss(rollout, order[start : start + s.mini_batch_size])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip_gradients(params, s.grad_clip)
                self.optimizer.step()
                for key, value in terms.items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1
        return {k: v / updates for k, v in totals.items()}

    def minibatch_loss(self, rollout: Rollout, rows: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The loss on `rows` of `rollout`: the clipped policy surrogate plus, with GAE, the weighted
        clipped value loss or, with GRPO, the KL to the reference weighted by beta; and its terms."""
        s = self.settings
        mask = rollout.mask[rows]
        logprobs, values, logits = policy_outputs(self.policy, self.head, rollout.ids[rows])
        policy_loss, clip_fraction = ppo_policy_loss(logprobs, rollout.old_logprobs[rows], rollout.advantages[rows],
                                                     mask, s.clip)
        if s.estimator == "grpo":
            reference_term, name = masked_mean(kl_k3(logprobs, rollout.ref_logprobs[rows]), mask), "kl_loss"
            loss = policy_loss + self.kl.beta * reference_term
        else:
            reference_term = ppo_value_loss(values, rollout.old_values[rows], rollout.returns[rows], mask,
                                            s.value_clip)
            name = "value_loss"
            loss = policy_loss + s.value_coef * reference_term
        with torch.no_grad():
            probs = logits.float().softmax(-1)
            entropy = masked_mean(-(probs * probs.clamp_min(1e-12).log()).sum(-1), mask)
        terms = {"policy_loss": policy_loss, name: reference_term, "clip_fraction": clip_fraction, "entropy": entropy}
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    # ---- the run -------------------------------------------------------------------------------

    def run(self, *, resume: bool = False) -> None:
        """Iterate to `iterations` (continuing from the latest checkpoint if `resume`)."""
        s = self.settings
        torch.manual_seed(s.seed)
        if resume:
            self.resume()
        bar = Progress(total=s.iterations, initial=self.iteration, desc="ppo", unit="it")
        with self.run_dir.tracking(s.loggers, self.config, self.iteration if resume else None):
            while self.iteration < s.iterations:
                start = time.perf_counter()
                rollout = self.rollout(self.batch_indices())
                rollout_seconds = time.perf_counter() - start
                losses = self.update(rollout)
                if s.adaptive_kl:
                    self.kl.update(rollout.stats["kl"], len(rollout.ids))
                self.iteration += 1
                record = {"step": self.iteration, **rollout.stats, **losses, "rollout_s": rollout_seconds,
                          "update_s": time.perf_counter() - start - rollout_seconds,
                          "samples": [{"prompt": p, "response": r, "score": sc} for p, r, sc in rollout.samples]}
                if self.eval_ids and (self.iteration % s.eval_every == 0 or self.iteration == s.iterations):
                    record |= self.evaluate()
                self.run_dir.log(record)
                bar.update(1)
                bar.set_postfix(reward=f"{rollout.stats['reward']:.3f}", kl=f"{rollout.stats['kl']:.3f}")
                if self.iteration % s.save_every == 0 or self.iteration == s.iterations:
                    self.save_checkpoint()
        bar.close()

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-N/` (N the iteration: the adapter + `trainer_state.pt`), keep the
        newest `keep_last`, and refresh the reward plot."""
        state = {"iteration": self.iteration, "optimizer": self.optimizer.state_dict(), "beta": self.kl.beta,
                 "value_head": self.head.state_dict(), "score_moments": self.score_moments.state_dict(),
                 "rng": torch.get_rng_state()}

        def write(tmp: Path) -> None:
            save_adapter(self.policy, tmp / "adapter", base=self.config.policy)
            torch.save(state, tmp / STATE_FILE)

        path = self.run_dir.save_checkpoint(self.iteration, write, self.settings.keep_last)
        self.run_dir.plot("reward.png", PPO_PANELS | (EVAL_PANEL if self.eval_ids else {}))
        return path

    def resume(self) -> None:
        """Load the newest checkpoint: adapter, value head, optimizer, KL coefficient, running score
        statistics, iteration and RNG state."""
        from lmforge.train.sft import AdapterFiles

        def read(path: Path) -> dict[str, Any]:
            AdapterFiles(self.config.policy).load(self.policy, path)
            return torch.load(path / STATE_FILE, weights_only=True)

        path, state = self.run_dir.read_latest_checkpoint(read)
        self.optimizer.load_state_dict(state["optimizer"])
        self.head.load_state_dict(state["value_head"])
        self.kl.beta, self.iteration = state["beta"], state["iteration"]
        if "score_moments" in state:
            self.score_moments.load_state_dict(state["score_moments"])
        elif self.settings.use_score_scaling:
            raise ValueError(f"cannot resume from {path} with use_score_scaling: it holds no running score statistics")
        torch.set_rng_state(state["rng"])
        self.run_dir.resumed(path, self.iteration, unit="iteration")


def load_policy(path: Path, adapter: AdapterConfig) -> tuple[nn.Module, Tokenizer]:
    """The SFT model (an HF directory) with fresh LoRA adapters for PPO, and its tokenizer."""
    if is_adapter_dir(path):
        raise ValueError(f"ppo: {path} is an adapter; merge it first (`lmforge merge --checkpoint {path} --out DIR`) "
                         "so that the PPO adapter has a base model directory")
    if adapter.method not in ("lora", "qlora"):
        raise ValueError(f"ppo trains LoRA adapters (the reference is the model with them disabled); "
                         f"adapter.method {adapter.method!r} is not supported")
    tokenizer = Tokenizer.from_dir(path)
    return apply_method(load_model(path, dtype=torch.float32), adapter, tokenizer), tokenizer


def ppo(config: PPOConfig, *, resume: bool = False, scorer: Scorer | None = None,
        safety: Scorer | None = None) -> Path:
    """Run PPO; returns the adapter directory. `scorer`/`safety` stand in for the reward model paths."""
    policy, tokenizer = load_policy(config.policy, config.adapter)
    if scorer is None or (safety is None and config.safety_reward is not None):
        scorer = scorer or RewardScorer.load(config.reward)
        if safety is None and config.safety_reward is not None:
            safety = RewardScorer.load(config.safety_reward)
    eval_prompts = [] if config.eval_prompts is None else read_prompts(config.eval_prompts,
                                                                         split=config.eval_prompts_split)
    trainer = PPOTrainer(config, policy, tokenizer, scorer, read_prompts(config.prompts, split=config.prompts_split),
                         safety=safety, eval_prompts=eval_prompts)
    started = time.perf_counter()
    trainer.run(resume=resume)
    out = config.out_dir / "adapter"
    save_adapter(policy, out, base=config.policy)
    tokenizer.save(out)
    last = trainer.run_dir.records()[-1]
    trainer.run_dir.write_report(title="PPO", config=config, model=policy, plot="reward.png",
                                 seconds=time.perf_counter() - started,
                                 samples=[(sample["prompt"], f"{sample['response']} (score {sample['score']:.3f})")
                                          for sample in last["samples"]])
    return out


def load_ppo_config(path: str | Path, overrides: list[str]) -> PPOConfig:
    return load_recipe(PPOConfig, path, overrides)
