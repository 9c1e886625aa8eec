"""LoRA (Hu et al. 2021), DoRA (Liu et al. 2024) and QLoRA (Dettmers et al. 2023) on the decoder's
linear layers.

`add_lora` replaces targeted `nn.Linear` modules, in place, by `LoRALinear`: the frozen weight
and bias keep their names (`q_proj.weight`), and the update lives in `q_proj.lora_A.weight`
(r, in) and `q_proj.lora_B.weight` (out, r), as PEFT names them; DoRA adds the magnitude vector
`q_proj.lora_magnitude_vector` (out,). Ranks and alphas may differ by module (PEFT's `rank_pattern`
and `alpha_pattern`). With `quantize=True` every linear layer of the blocks stores its frozen
weight in NF4 (torchao), dequantised on the fly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.peft.saved_modules import unwrap_saved_modules
from lmforge.peft.tokens import merge_tokens_and_unload

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
NF4_BLOCK = 64  # weights per NF4 block (QLoRA's choice)
NF4_SCALER_BLOCK = 256  # block scales per quantisation factor (QLoRA's double quantisation)

Targets = Sequence[str] | Literal["all-linear"] | str


@cache
def _nf4() -> tuple[Any, Any, Any]:
    """torchao's NF4 pieces, imported on first use (importing torchao is slow and noisy)."""
    from torchao.quantization import NF4Tensor, to_nf4
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    return NF4Tensor, to_nf4, linear_nf4


def is_nf4(t: Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor" and isinstance(t, _nf4()[0])


def to_nf4(weight: Tensor) -> Tensor:
    """`weight` in NF4: 64-weight blocks, their scales quantised in groups of up to 256."""
    if weight.numel() % NF4_BLOCK:
        raise ValueError(f"NF4 needs a weight size divisible by {NF4_BLOCK}, got shape {tuple(weight.shape)}")
    blocks = weight.numel() // NF4_BLOCK
    return _nf4()[1](weight.detach(), NF4_BLOCK, math.gcd(NF4_SCALER_BLOCK, blocks))


def nf4_nbytes(t: Tensor) -> int:
    """Bytes an NF4 tensor really stores: the sum of its inner tensors."""
    names, _ = t.__tensor_flatten__()
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)


class FrozenLinear(nn.Module):
    """A linear layer with a frozen weight, stored dense or in NF4 (`quantized`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.quantized = is_nf4(weight)

    def base(self, x: Tensor) -> Tensor:
        if not self.quantized:
            return F.linear(x, self.weight, self.bias)
        y = _nf4()[2](x, self.weight)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> Tensor:
        """The weight as a dense tensor (dequantised if stored in NF4)."""
        return self.weight.get_original_weight() if self.quantized else self.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x)

    def folded(self) -> Tensor:
        """The dense weight with any adapter folded in, in float32 (`merge_and_unload`)."""
        return self.dense_weight().float()

    def folded_bias(self) -> Tensor | None:
        return self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4={self.quantized}"


class LoRALinear(FrozenLinear):
    """y = x W^T + b + s (x A^T) B^T with W, b frozen and s = alpha / r (alpha / sqrt(r) for rsLoRA).

    A starts kaiming-uniform and B at zero (PEFT's init), so the layer starts equal to the base.
    DoRA (`dora`) rescales each output row of W + s B A to the trained magnitude m:
    y = m / ||W + s B A|| * (x W^T + s x A^T B^T) + b, the norm taken as a constant (no gradient),
    computed as PEFT's `DoraLinearLayer` does (dropout, when on, applies to the input of both terms).
    `merged`: the update is folded into W. `disabled`: the layer computes the base alone."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, r: int, alpha: float, dropout: float = 0.0, *, rslora: bool = False,
        dora: bool = False, generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(weight, bias)
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.r, self.alpha, self.dropout, self.rslora, self.dora = r, alpha, dropout, rslora, dora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        with torch.no_grad():  # drawn on the CPU in float32, so a seed gives the same A on any device
            a = nn.init.kaiming_uniform_(torch.empty(r, self.in_features), a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        if dora:  # ||W|| per output row: the layer starts equal to the base
            norm = torch.linalg.norm(self.dense_weight().float(), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.weight.dtype))
        self.merged = False
        self.disabled = False
        self.merged_norm: Tensor | None = None  # DoRA: ||W + s B A|| of the weight before merging

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        sign = int(not self.disabled) - int(self.merged)  # the update to add on top of W as stored
        if sign == 0:
            return y
        if self.dora and sign < 0:
            raise ValueError("a merged DoRA layer cannot be disabled; unmerge it first")
        x2 = x.reshape(-1, self.in_features)
        y2 = y.reshape(-1, self.out_features)
        if self.dora:
            return self._dora(x2, y2).view(y.shape)
        if self.dropout and self.training:
            x2 = F.dropout(x2, self.dropout, training=True)
        h = F.linear(x2, self.lora_A.weight)  # (N, r): the cheap side first
        out = torch.addmm(y2, h, self.lora_B.weight.t(), alpha=sign * self.scaling)
        return out.view(y.shape)

    def _dora(self, x: Tensor, y: Tensor) -> Tensor:
        """DoRA's output for rows `x` (N, in) given the base's `y` (N, out), as PEFT computes it."""
        weight = self.dense_weight().to(x.dtype)
        with torch.no_grad():  # the norm is a constant to the gradient (the paper's section 4.3)
            lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype)
            norm = torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)
        scale = (self.lora_magnitude_vector / norm).view(1, -1)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
            base = F.linear(x, weight)
        else:
            base = y if self.bias is None else y - self.bias
        lora = F.linear(F.linear(x, self.lora_A.weight), self.lora_B.weight)
        return y + (scale - 1) * base + scale * lora * self.scaling

    def delta(self) -> Tensor:
        """s B A, the update to W, in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _dora_factor(self, updated: Tensor) -> Tensor:
        """m / ||W + s B A|| as a column (out, 1), from the unmerged `updated` = W + s B A (float32)."""
        return (self.lora_magnitude_vector.float() / torch.linalg.norm(updated, dim=1)).view(-1, 1)

    def folded(self) -> Tensor:
        weight = self.dense_weight().float()
        if self.merged:
            return weight
        updated = weight + self.delta()
        return self._dora_factor(updated) * updated if self.dora else updated

    @torch.no_grad()
    def merge(self) -> None:
        if self.quantized:
            raise ValueError("cannot merge LoRA into NF4 weights in place; merge into the full-precision base "
                             "(lmforge.peft.merge_and_save) or use merge_and_unload (dequantises)")
        if not self.merged:
            if self.dora:
                self.merged_norm = torch.linalg.norm(self.weight.float() + self.delta(), dim=1)
            self.weight.copy_(self.folded())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.weight.float()
            if self.dora:
                weight = weight * (self.merged_norm / self.lora_magnitude_vector.float()).view(-1, 1)
            self.weight.copy_(weight - self.delta())
            self.merged = False

    def extra_repr(self) -> str:
        dora = ", dora" if self.dora else ""
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}{dora}"


# ---- whole models ------------------------------------------------------------------------------


def linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers LoRA may target: every one but the output head (PEFT's all-linear)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, FrozenLinear)) and name != "lm_head" and ".lora_" not in name]


def matches(name: str, targets: Targets) -> bool:
    """PEFT's rule: a list matches a module by its name or a dotted suffix; a string is a full regex."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_names(model: nn.Module, targets: Targets) -> list[str]:
    """The linear layers `targets` select; an error names any target that selects none."""
    names = linear_names(model)
    chosen = [n for n in names if matches(n, targets)]
    missing = [] if isinstance(targets, str) else [t for t in targets if not any(matches(n, [t]) for n in names)]
    if missing or not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"LoRA target module(s) {', '.join(missing) or repr(targets)} not found; "
                         f"the model's linear layers are named {', '.join(leaves)}")
    return chosen


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the value of the first key (a regex) that matches the end of
    `name` at a dot boundary, else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def add_lora(
    model: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Targets = ATTENTION,
    rslora: bool = False, dora: bool = False, rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None, quantize: bool = False, generator: torch.Generator | None = None,
) -> nn.Module:
    """Freeze `model` and give its targeted linear layers LoRA (or DoRA) adapters (in place; returns
    `model`). `rank_pattern`/`alpha_pattern` set r and alpha of the modules they match (PEFT's rules).
    `quantize` stores every block linear weight in NF4 (QLoRA), targeted or not."""
    if any(lora_layers(model)):
        raise ValueError("the model already has LoRA adapters")
    chosen = set(target_names(model, targets))
    model.requires_grad_(False)
    for name in linear_names(model):
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear) or not (name in chosen or quantize):
            continue
        try:
            weight = to_nf4(old.weight.detach()) if quantize else old.weight.detach()
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        bias = None if old.bias is None else old.bias.detach()
        if name in chosen:
            rank, scale = pattern_value(rank_pattern or {}, name, r), pattern_value(alpha_pattern or {}, name, alpha)
            new: FrozenLinear = LoRALinear(weight, bias, rank, scale, dropout, rslora=rslora, dora=dora,
                                           generator=generator)
        else:
            new = FrozenLinear(weight, bias)
        replace_module(model, name, new.train(old.training))
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (the forward pass then costs what the base's does)."""
    for _, m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take the adapters back out of the base weights."""
    for _, m in lora_layers(model):
        m.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block `model` computes its base model (LoRA updates and soft prompts off), e.g.
    as the frozen reference of DPO or PPO, without a second copy of the weights."""
    switches = [m for m in model.modules() if hasattr(m, "disabled")]
    before = [m.disabled for m in switches]
    for m in switches:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(switches, before):
            m.disabled = state


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace each adapted/frozen layer by a plain `nn.Linear` holding its weight with the adapter
    folded in (LoRA, DoRA, IA3; NF4 weights are dequantised first), trainable token rows by plain
    layers holding them, and modules_to_save wrappers by their trained copies; returns the plain
    model, in place."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, FrozenLinear)]:
        bias = m.folded_bias()
        linear = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(m.folded().to(m.weight.dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone().to(m.bias.dtype), requires_grad=False)
        replace_module(model, name, linear.train(m.training))
    return merge_tokens_and_unload(unwrap_saved_modules(model))
