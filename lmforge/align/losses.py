"""The losses and advantage estimates of preference alignment, as pure functions on tensors.

Masks are 1 on response tokens and 0 on padding; every mean over tokens is a masked mean, so a
padded batch gives the same numbers as its rows one at a time."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` where `mask` is 1 (over `dim`, or everything)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Reward-model loss: -log sigmoid(r_chosen - r_rejected - margin), averaged over pairs.
    LLaMA-2 adds a margin that grows with how clearly annotators preferred the chosen answer."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Sum over each row of log p(label) where `mask` is 1: (B, T, V), (B, T), (B, T) -> (B,)."""
    logps = token_logprobs(logits, labels)
    return (logps * mask.to(logps.dtype)).sum(-1)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) at every position: (B, T, V), (B, T) -> (B, T). Labels may hold any id where
    masked later (they are clamped into the vocabulary here)."""
    labels = labels.clamp(min=0, max=logits.shape[-1] - 1)
    return torch.gather(logits.float().log_softmax(-1), -1, labels[..., None]).squeeze(-1)


DPOLossType = Literal["sigmoid", "ipo", "sigmoid_norm"]  # TRL's `loss_type` names


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: DPOLossType = "sigmoid",
             chosen_tokens: Tensor | None = None,
             rejected_tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A DPO-family loss from summed sequence log-probabilities (B,), named and defined as in TRL's
    `loss_type`. Returns the mean loss and the implicit rewards beta * (log pi - log pi_ref) of the
    chosen and rejected responses (from the summed log-probs, whatever the loss).

    - "sigmoid": DPO (Rafailov et al. 2023), -log sigmoid(beta * margin), the margin being the chosen
      minus the rejected log-ratio log pi - log pi_ref.
    - "sigmoid_norm": the same on log-ratios averaged over each response's tokens (length-normalised DPO).
    - "ipo": IPO (Azar et al. 2023), (margin - 1 / (2 beta))^2 on log-ratios averaged over each
      response's tokens (TRL's normalisation, which the IPO authors confirmed); no label smoothing.
    The averaged losses need the response token counts (B,). `label_smoothing` makes the logistic
    losses conservative DPO (the preference label flipped with that probability)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type in ("ipo", "sigmoid_norm"):
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"loss_type {loss_type!r} needs the response token counts")
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    elif loss_type == "sigmoid":
        margin = chosen_ratio - rejected_ratio
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(get_args(DPOLossType))}")
    if loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label smoothing belongs to the logistic losses, not 'ipo'")
        loss = (margin - 1 / (2 * beta)) ** 2
    else:
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    return loss.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise `x` to unit variance (and zero mean) over the masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens (B, T). A token's successor is the next
    masked-in position; past the last one the value is 0. Returns (advantages, returns = advantages + values)."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * mask[:, t]
        # padding is skipped: the running estimates pass through unmasked positions unchanged
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
        next_advantage = torch.where(mask[:, t] > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017) per token: the loss and the clipped fraction."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction.detach()


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2) -> Tensor:
    """Clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old ± clip) - R)^2), masked mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token KL estimate log pi - log pi_ref (InstructGPT's penalty, k1 estimator)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate that is never negative: r - log r - 1 with r = pi_ref / pi
    (Schulman's k3; GRPO's KL term)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def group_advantages(scores: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO's advantage (Shao et al. 2024): each score against the other samples of its prompt,
    (r - mean) / (std + eps), for scores laid out as consecutive groups of `group_size`."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.view(-1, group_size)
    std = groups.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    return ((groups - groups.mean(1, keepdim=True)) / (std + eps)).view(-1)


class AdaptiveKLController:
    """Ziegler et al. (2019): move beta so that the observed KL tracks `target` over `horizon` samples,
    kept within `bounds` (min, max): the proportional step can otherwise shrink beta towards 0 (or
    below 0, when a batch holds more than 5 x `horizon` samples) or grow it without limit."""

    def __init__(self, beta: float, target: float, horizon: int = 10000,
                 bounds: tuple[float, float] = (0.0, math.inf)) -> None:
        self.beta, self.target, self.horizon, self.bounds = beta, target, horizon, bounds

    def update(self, kl: float, samples: int) -> float:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta = min(self.bounds[1], max(self.bounds[0], self.beta * (1 + error * samples / self.horizon)))
        return self.beta


class RunningMoments:
    """The mean and standard deviation (Bessel-corrected) of every value seen so far, updated a batch
    at a time with Chan et al.'s pairwise combination, in float64: the running score statistics of
    TRL's `use_score_scaling` (from MOSS-RLHF). The standard deviation is 1 until the values spread."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # m2: the sum of squared deviations from the mean

    def update(self, x: Tensor) -> None:
        x = x.detach().double().flatten()
        n, batch_mean = x.numel(), float(x.mean())
        total, delta = self.count + n, batch_mean - self.mean
        self.m2 += float(((x - batch_mean) ** 2).sum()) + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.m2 > 0 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
