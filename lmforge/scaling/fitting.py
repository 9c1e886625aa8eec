"""Fit L(N, D) = E + A/N^α + B/D^β to measured losses as Hoffmann et al. (2022, appendix D.2) did.

With A = exp(a), B = exp(b), E = exp(e), minimise over (a, b, e, α, β)
    Σ_i Huber_δ( LSE(a − α log N_i, b − β log D_i, e) − log L_i ),  δ = 1e-3,
with L-BFGS started from a grid of initialisations: α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1},
a, b ∈ {0, 5, …, 25}. Every grid point's objective is evaluated at once, L-BFGS (torch.optim.LBFGS,
strong-Wolfe line search, float64) runs from the `starts` best of them, and the lowest optimum wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.console import Progress
from lmforge.scaling.law import ScalingLaw

HUBER_DELTA = 1e-3
GRID = {
    "a": np.arange(0, 30, 5.0),
    "b": np.arange(0, 30, 5.0),
    "e": np.arange(-1, 1.5, 0.5),
    "alpha": np.arange(0, 2.5, 0.5),
    "beta": np.arange(0, 2.5, 0.5),
}


@dataclass(frozen=True)
class LawFit:
    law: ScalingLaw
    objective: float  # the Huber objective at the optimum
    points: int


def objective(x: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor,
              delta: float = HUBER_DELTA) -> torch.Tensor:
    """Summed Huber loss of log-loss residuals; `x` is (..., 5) = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = (x[..., i : i + 1] for i in range(5))
    terms = torch.stack(torch.broadcast_tensors(a - alpha * log_n, b - beta * log_d, e), dim=-1)
    residual = torch.logsumexp(terms, dim=-1) - log_l
    return torch.nn.functional.huber_loss(residual, torch.zeros_like(residual), reduction="none", delta=delta).sum(-1)


def fit_law(params, tokens, losses, *, delta: float = HUBER_DELTA, starts: int = 16) -> LawFit:
    """Fit the law to runs of `params` parameters trained on `tokens` tokens reaching `losses`."""
    n, d, l = (np.asarray(v, dtype=np.float64) for v in (params, tokens, losses))
    if not (n.shape == d.shape == l.shape and n.ndim == 1):
        raise ValueError("params, tokens and losses must be equal-length sequences")
    if len(n) < 5:
        raise ValueError(f"fitting L(N, D) needs at least 5 runs (5 parameters), got {len(n)}")
    if not (np.all(n > 0) and np.all(d > 0) and np.all(l > 0) and np.all(np.isfinite(l))):
        raise ValueError("params, tokens and losses must be positive and finite")
    log_n, log_d, log_l = (torch.from_numpy(np.log(v)) for v in (n, d, l))
    grid = torch.cartesian_prod(*(torch.from_numpy(GRID[k]) for k in ("a", "b", "e", "alpha", "beta")))
    with torch.no_grad():
        ranked = grid[objective(grid, log_n, log_d, log_l, delta).argsort()[:starts]]
    best_x, best = None, float("inf")
    for init in Progress(ranked, desc="fit L(N, D)", unit="start", leave=False):
        x, value = _lbfgs(init, log_n, log_d, log_l, delta)
        if value < best:
            best_x, best = x, value
    a, b, e, alpha, beta = best_x.tolist()
    law = ScalingLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)
    return LawFit(law, best, len(n))


def _lbfgs(init: torch.Tensor, log_n, log_d, log_l, delta: float) -> tuple[torch.Tensor, float]:
    x = init.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-12,
                                  history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = objective(x, log_n, log_d, log_l, delta)
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        value = float(objective(x, log_n, log_d, log_l, delta))
    return x.detach(), value if np.isfinite(value) else float("inf")
