"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations, in PEFT's layout.

`add_ia3` replaces targeted `nn.Linear` modules, in place, by `IA3Linear`: the frozen weight and
bias keep their names, and the vector lives in `<module>.ia3_l`, as PEFT names it. A feed-forward
module (PEFT's `feedforward_modules`) scales its input, (1, in); any other scales its output,
(out, 1). The vectors start at one, so the model starts equal to the base.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lmforge.peft.lora import FrozenLinear, Targets, lora_layers, replace_module, target_names
from lmforge.peft.saved_modules import suffix_match

IA3_TARGETS = ("k_proj", "v_proj", "down_proj")  # PEFT's defaults for the Llama family
IA3_FEEDFORWARD = ("down_proj",)


class IA3Linear(FrozenLinear):
    """y = (x * l) W^T + b for a feed-forward module, y = (x W^T + b) * l otherwise, with W, b frozen."""

    def __init__(self, weight: Tensor, bias: Tensor | None, feedforward: bool) -> None:
        super().__init__(weight, bias)
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=weight.dtype, device=weight.device))
        self.disabled = False

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return self.base(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base((x.to(scale.dtype) * scale).to(x.dtype))
        y = self.base(x)
        return (y * scale).to(y.dtype)

    def folded(self) -> Tensor:
        return self.dense_weight().float() * self.ia3_l.float()  # columns (feed-forward) or rows

    def folded_bias(self) -> Tensor | None:
        if self.bias is None or self.feedforward:
            return self.bias
        return self.bias * self.ia3_l.flatten().to(self.bias.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedforward={self.feedforward}"


def is_feedforward(name: str, feedforward: Targets) -> bool:
    """PEFT's rule for `feedforward_modules`: a string is a full regex, a list matches by plain suffix."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return suffix_match(name, feedforward)


def check_feedforward(targets: Targets, feedforward: Targets) -> None:
    """PEFT's check: as lists, the feed-forward modules are a subset of the targets."""
    if not isinstance(targets, str) and not isinstance(feedforward, str) and not set(feedforward) <= set(targets):
        raise ValueError(f"feedforward_modules {sorted(set(feedforward) - set(targets))} are not among the "
                         f"target modules {sorted(targets)}")


def add_ia3(model: nn.Module, *, targets: Targets = IA3_TARGETS, feedforward: Targets = IA3_FEEDFORWARD) -> nn.Module:
    """Freeze `model` and give its targeted linear layers (IA)³ vectors (in place; returns `model`).
    `feedforward` picks the targets whose input is scaled; as lists it must be a subset of `targets`."""
    if any(lora_layers(model)) or any(ia3_layers(model)):
        raise ValueError("the model already has adapters")
    check_feedforward(targets, feedforward)
    chosen = target_names(model, targets)
    model.requires_grad_(False)
    for name in chosen:
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"(IA)³ target {name} is a {type(old).__name__}, not a linear layer")
        bias = None if old.bias is None else old.bias.detach()
        new = IA3Linear(old.weight.detach(), bias, is_feedforward(name, feedforward))
        replace_module(model, name, new.train(old.training))
    return model


def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Linear]]:
    for name, m in model.named_modules():
        if isinstance(m, IA3Linear):
            yield name, m
