"""A batch-1 decode step's matrix-vector products, written for inductor's CPU code generator.

At batch 1 a decode step is one pass over the weights, and eager PyTorch spends as long again on launching its
hundred-odd operators. Inside a `torch.compile`d CPU graph, a single row's product written as a multiply and a sum
over the input features becomes a loop that inductor fuses with its neighbours (the norm before it, the activation
after), streaming each weight row once with the weights converted to float32 in registers. Over a whole step this
measured faster than the library calls (MKL's sgemv, oneDNN's bfloat16 kernel) for float32 and bfloat16 weights
(`benchmarks/generate.py`); int8 weights keep torch's int8 kernel, which reads them faster than such a loop.
`compile_options` makes inductor keep the input vector in memory instead of recomputing it (a norm's output, say)
for every weight row. The eager path keeps `F.linear`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def compile_options(device: torch.device) -> dict[str, Any]:
    """`torch.compile`'s settings for a decode step. CUDA: CUDA graphs remove the launch overhead. CPU: an input
    read by more than one output (the vector of every `matvec`) is computed once into memory."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}
    return {"options": {"realize_opcount_threshold": 1}}


def is_compiled_row(x: Tensor) -> bool:
    """Whether `x` is a single row being traced into a compiled CPU graph: the case `matvec` serves."""
    return x.device.type == "cpu" and torch.compiler.is_compiling() and x.shape[:-1].numel() == 1


CASCADE_SUM_SIZE = 4096  # inductor sums more terms than this through a slower, pairwise accumulator


def matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x Wᵀ for one row `x` (..., in) and `weight` (out, in), summed in float32; in `x`'s dtype. More input features
    than `CASCADE_SUM_SIZE` are summed in equal parts, one loop each (measured 1.1-1.8x faster on 4864 features)."""
    row, features = x.float().unsqueeze(-2), x.shape[-1]
    parts = -(-features // CASCADE_SUM_SIZE)
    if parts == 1:
        return (row * weight.float()).sum(-1).to(x.dtype)
    bounds = [features * i // parts for i in range(parts + 1)]
    sums = [(row[..., a:b] * weight[:, a:b].float()).sum(-1) for a, b in zip(bounds, bounds[1:])]
    return sum(sums[1:], sums[0]).to(x.dtype)


class MatVecLinear(nn.Linear):
    """`nn.Linear` that computes a single row by `matvec` inside a compiled CPU graph (same parameters and names)."""

    def forward(self, x: Tensor) -> Tensor:
        if not is_compiled_row(x):
            return F.linear(x, self.weight, self.bias)
        y = matvec(x, self.weight)
        return y if self.bias is None else y + self.bias


def use_matvec_linears(model: nn.Module) -> None:
    """Turn every plain `nn.Linear` of `model` into a `MatVecLinear` in place (the same parameter tensors)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear
