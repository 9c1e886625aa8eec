"""Chinchilla's parametric loss L(N, D) = E + A/N^α + B/D^β and the compute-optimal split of C = 6ND.

Minimising L under C = 6ND gives (Hoffmann et al. 2022, eq. 4)
N_opt(C) = G (C/6)^a, D_opt(C) = G⁻¹ (C/6)^b, with G = (αA / βB)^(1/(α+β)), a = β/(α+β), b = α/(α+β).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PETAFLOP_DAY = 1e15 * 86400  # FLOPs in a petaFLOP/s-day
TOKENS_PER_PARAMETER = 20  # Chinchilla's rule of thumb: train on about 20 tokens per parameter


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta for N parameters trained on D tokens."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params, tokens):
        """Predicted loss; takes floats or numpy arrays."""
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    @property
    def params_exponent(self) -> float:
        """a in N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def tokens_exponent(self) -> float:
        """b in D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def optimal_params(self, flops):
        """N_opt(C) = G (C/6)^a."""
        return self.G * np.power(np.asarray(flops, dtype=float) / 6, self.params_exponent)

    def optimal_tokens(self, flops):
        """D_opt(C) = (C/6)^b / G."""
        return np.power(np.asarray(flops, dtype=float) / 6, self.tokens_exponent) / self.G


CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, approach 3


@dataclass(frozen=True)
class Allocation:
    """N parameters trained on D tokens, and the loss a law predicts for them."""

    params: float
    tokens: float
    loss: float

    @property
    def tokens_per_parameter(self) -> float:
        return self.tokens / self.params


@dataclass(frozen=True)
class ComputeOptimal:
    """How to spend `flops`: the law's minimum and the 20-tokens-per-parameter rule."""

    flops: float
    law: ScalingLaw
    optimum: Allocation
    rule: Allocation


def check_flops(flops: float) -> float:
    if not (isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0):
        raise ValueError(f"flops must be a positive number of FLOPs (e.g. 5.76e23), got {flops!r}")
    return float(flops)


def compute_optimal(flops: float, law: ScalingLaw = CHINCHILLA) -> ComputeOptimal:
    """Compute-optimal parameters N and tokens D for a budget of C = 6ND training FLOPs."""
    flops = check_flops(flops)
    n, d = float(law.optimal_params(flops)), float(law.optimal_tokens(flops))
    n_rule = math.sqrt(flops / (6 * TOKENS_PER_PARAMETER))
    d_rule = TOKENS_PER_PARAMETER * n_rule
    return ComputeOptimal(
        flops, law, Allocation(n, d, float(law.loss(n, d))), Allocation(n_rule, d_rule, float(law.loss(n_rule, d_rule)))
    )


def count(value: float) -> str:
    """1.23e9 -> '1.23 B', as model sizes and token counts are written."""
    return _scaled(value, ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")))


def si(value: float, unit: str) -> str:
    """4.61e10, 'FLOP' -> '46.1 GFLOP'."""
    return _scaled(value, ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")), unit)


def _scaled(value: float, prefixes: tuple[tuple[float, str], ...], unit: str = "") -> str:
    for scale, prefix in prefixes:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def render_compute_optimal(result: ComputeOptimal) -> str:
    """A readable table of `compute_optimal`'s answer."""
    law = result.law
    rows = [("law minimum", result.optimum), (f"{TOKENS_PER_PARAMETER} tokens/parameter", result.rule)]
    lines = [
        f"Compute budget C = {result.flops:.3g} FLOPs ({result.flops / PETAFLOP_DAY:,.4g} petaFLOP/s-days), C = 6ND",
        f"Law: L(N, D) = {law.E:.4g} + {law.A:.4g}/N^{law.alpha:.3g} + {law.B:.4g}/D^{law.beta:.3g}"
        + (" (Chinchilla approach 3, Hoffmann et al. 2022)" if law == CHINCHILLA else ""),
        f"  N_opt = {law.G:.4g} (C/6)^{law.params_exponent:.3f}, D_opt = (C/6)^{law.tokens_exponent:.3f} / {law.G:.4g}",
        "",
        f"{'':24}{'parameters N':>14}{'tokens D':>12}{'D/N':>8}{'loss':>8}",
    ]
    for label, a in rows:
        lines.append(f"{label:24}{count(a.params):>14}{count(a.tokens):>12}"
                     f"{a.tokens_per_parameter:>8.1f}{a.loss:>8.3f}")
    if law == CHINCHILLA:
        lines += ["", "The published (rounded) constants put the minimum at more tokens per parameter than "
                      "Chinchilla's other two\napproaches and its ~20; Besiroglu et al. (2024) trace this to the "
                      "rounding and an unconverged fit."]
    return "\n".join(lines)

