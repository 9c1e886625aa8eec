"""Scaling: plan a run's parameters, FLOPs, memory and time; compute-optimal sizes; IsoFLOP sweeps and fits.

- `planner`: `plan(...)` -> `Plan`, `render_plan(plan)` (`lmforge plan --preset|--config`).
- `law`: Chinchilla's L(N, D), `compute_optimal(C)`, `render_compute_optimal` (`lmforge plan --flops`).
- `fitting`: `fit_law(N, D, L)`, the Huber/L-BFGS fit of L(N, D).
- `isoflop`: `sweep(config, overrides)` and `fit(runs_dir)` (`lmforge scaling sweep|fit`); it imports
  the training stack, so it is not imported here.
"""

from lmforge.scaling.law import CHINCHILLA, ComputeOptimal, ScalingLaw, compute_optimal, render_compute_optimal
from lmforge.scaling.planner import Plan, plan, plan_model, render_plan

__all__ = ["CHINCHILLA", "ComputeOptimal", "Plan", "ScalingLaw", "compute_optimal", "plan", "plan_model",
           "render_compute_optimal", "render_plan"]
