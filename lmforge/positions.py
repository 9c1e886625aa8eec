"""Position encodings: rotary embeddings (partial, with linear, Llama-3 or LongRoPE scaling, and a
local base for sliding-window layers) and ALiBi's attention biases."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmforge.config import ModelConfig


def rope_inv_freq(config: ModelConfig, *, local: bool = False, long: bool = False) -> Tensor:
    """Rotary inverse frequencies of the first `rotary_dim` dims, with linear, Llama-3 or LongRoPE
    scaling when configured (LongRoPE: its short factors, or its long ones if `long`); `local`: those of
    the sliding-window layers when they have their own base (`rope_local_base_freq`, never scaled)."""
    dim = config.rotary_dim
    theta = config.rope_local_base_freq if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = {} if local else config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        inv_freq = 1.0 / (factors * config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq


def rope_attention_scaling(config: ModelConfig) -> float:
    """LongRoPE's factor on cos and sin: `attention_factor`, else sqrt(1 + ln(s) / ln(original length))
    for s = `factor` (default: max_position_embeddings / original length) when s > 1 (transformers)."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al.): 2^(-8i/n) for i = 1..n when n is a power of two; otherwise
    those of the power of two below n, then every other slope of the power above (as BLOOM computes them)."""
    below = 2 ** math.floor(math.log2(n_heads))
    slopes = torch.tensor(2 ** (-(2 ** -(math.log2(below) - 3)))).pow(torch.arange(1, 1 + below, dtype=torch.int32))
    if below != n_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * below) - 3))))
        odd = torch.arange(1, 1 + 2 * min(below, n_heads - below), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, extra.pow(odd)])
    return slopes


def alibi_bias(slopes: Tensor, allowed: Tensor, pad: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Additive (B|1, H, q_len, k_len) attention bias: slope x the key's position (counted from the
    row's first real token, as transformers counts it from the attention mask; softmax ignores the
    query's own offset), -inf where the boolean `allowed` mask forbids."""
    k = torch.arange(allowed.shape[-1], device=allowed.device)[None]
    positions = k if pad is None else (k - pad[:, None]).clamp(min=0)
    bias = slopes[None, :, None, None] * positions[:, None, None, :].float()
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys by (B, 1, T, R) angles: the first R dims of each head."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, keep = x[..., :rotary], x[..., rotary:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)
