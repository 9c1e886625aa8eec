"""Sampling: the one `SamplingParams` type, and the filters on logits (pure functions, one row per sequence)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from lmforge.generate.grammar import Grammar

MAX_LOGPROBS = 20  # the most alternatives a row reports per token (OpenAI's top_logprobs limit)


class SamplingParams(BaseModel):
    """How to pick tokens and when to stop, validated once: a pydantic model, so recipes embed it as
    a field. A bad value raises pydantic's `ValidationError` (a `ValueError`) naming the field;
    `config.explain` words it in one line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)  # 0 is greedy
    top_k: int | None = Field(None, ge=0)  # None or 0: no top-k filter
    top_p: float | None = Field(None, gt=0, le=1)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # what torch.Generator.manual_seed takes
    # Logits processing, in vLLM's order: grammar mask, min_tokens, logit_bias, then the penalties.
    grammar: Grammar | None = None  # structured output: the text must match it
    min_tokens: int = Field(0, ge=0)  # stop tokens are masked until this many tokens are generated
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id -> added to its logit
    presence_penalty: float = Field(0.0, ge=-2, le=2)  # OpenAI's: over the tokens generated so far
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)  # HF's / vLLM's: over prompt and generated tokens
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # report each token's log-prob and N alternatives

    @property
    def processes_logits(self) -> bool:
        """Whether anything beyond temperature, top-k and top-p changes this row's logits."""
        return bool(self.grammar is not None or self.min_tokens or self.logit_bias or self.presence_penalty
                    or self.frequency_penalty or self.repetition_penalty != 1.0)

    def stopping_at(self, stop_token_ids: Sequence[int], seed: int | None = None) -> SamplingParams:
        """These settings as plain `SamplingParams`, stopping at `stop_token_ids`, with `seed` if given."""
        fields = self.model_dump(include=set(SamplingParams.model_fields))
        return SamplingParams(**(fields | {"stop_token_ids": tuple(stop_token_ids)}
                                 | ({} if seed is None else {"seed": seed})))


class StochasticSampling(SamplingParams):
    """The sampling section of a recipe that learns from sampled responses (PPO rollouts, rejection
    sampling): the temperature must be positive, or every sample would be the same greedy reply."""

    temperature: float = Field(1.0, gt=0)


def top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    """Keep the `k` largest logits of each row (ties at the k-th value are kept); -inf elsewhere."""
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches `p`
    (the most likely token is always kept); -inf elsewhere."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from (B, V) logits; temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits: Tensor, *, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> Tensor:
    """The distribution tokens are drawn from: softmax of the logits over `temperature` (> 0), after the
    top-k and top-p filters."""
    return top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p).softmax(dim=-1)
