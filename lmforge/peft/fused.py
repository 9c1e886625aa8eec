"""Adapters on modules that are one fused weight on disk and separate layers here: Phi-3's `qkv_proj`
and `gate_up_proj`, Falcon's and BLOOM's `query_key_value` (q_proj, k_proj, v_proj; gate_proj, up_proj).

PEFT adapts a fused module as one layer: one `lora_A` (r, in) that all parts share and a `lora_B`
(out, r) whose rows are the parts' rows (in the weight's on-disk order, `checkpoint.to_ours` splits
them); DoRA's magnitude and an output-scaling (IA)³ vector split like the rows, an input-scaling
(feed-forward) (IA)³ vector (1, in) is shared. Here each part is its own layer, so such an adapter
loads as one LoRA per part holding a copy of the shared A and its rows of B, at the fused rank and
alpha: exact, as each part's rows of s B A and of DoRA's row norms are the fused layer's.

Saving joins the parts again ("joined form"): as they are when all parts are adapted with equal A,
rank and alpha (an adapter that came from PEFT); otherwise exactly in block form: A the parts' A
stacked along the rank, B block-diagonal (a part without an adapter gets zero rows), rank the sum of
the parts' ranks and alpha so that the scaling is the first part's (other parts' B scaled by the
ratio of their scalings). A part without an adapter gets its weight's row norms as DoRA magnitude
(unchanged rows) and ones as (IA)³ vector; a feed-forward (IA)³ vector must be one for all parts.
Loading a joined adapter into a model that already has per-part layers (resuming) undoes the blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.checkpoint import module_on_disk, modules_in_ours
from lmforge.peft.ia3 import ia3_layers
from lmforge.peft.lora import FrozenLinear, linear_names, lora_layers

A, B, MAGNITUDE, IA3 = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".ia3_l"
ADAPTER_SUFFIXES = (A, B, MAGNITUDE, IA3)


def is_shared(suffix: str, tensor: Tensor) -> bool:
    """Whether a fused module's adapter tensor is shared by its parts (lora_A, an input-scaling (IA)³
    vector) rather than split along its rows."""
    return suffix == A or (suffix == IA3 and tensor.dim() == 2 and tensor.shape[0] == 1)


def fused_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """On-disk name -> our layers, in order, of each of the model's fused linear modules."""
    config, groups = model.config, {}
    for name in linear_names(model):
        disk = module_on_disk(config.family, name, config)
        parts = modules_in_ours(config.family, disk, config)
        if len(parts) > 1:
            groups[disk] = parts
    return groups


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _dense(layer: nn.Module) -> Tensor:
    return layer.dense_weight() if isinstance(layer, FrozenLinear) else layer.weight


@torch.no_grad()
def join_lora(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple[int, Any]]]:
    """`state` (our names) with each fused module's parts in joined form, and (r, alpha) of the fused
    modules whose rank or alpha that changed, by on-disk name."""
    state, layers, changed = dict(state), dict(lora_layers(model)), {}
    for disk, parts in fused_groups(model).items():
        adapted = [p for p in parts if p in layers]
        if not adapted:
            continue
        first = layers[adapted[0]]
        if len(adapted) == len(parts) and all(torch.equal(layers[p].lora_A.weight, first.lora_A.weight)
                                              and (layers[p].r, layers[p].alpha) == (first.r, first.alpha)
                                              for p in parts):
            continue
        rank = sum(layers[p].r for p in adapted)
        stacked = torch.cat([layers[p].lora_A.weight for p in adapted])
        offset = 0
        for part in parts:
            layer = model.get_submodule(part)
            block = torch.zeros(layer.out_features, rank, dtype=stacked.dtype, device=stacked.device)
            if part in layers:
                block[:, offset : offset + layer.r] = layer.lora_B.weight * (layer.scaling / first.scaling)
                offset += layer.r
            elif first.dora:
                norm = torch.linalg.norm(_dense(layer).float(), dim=1)
                state[part + MAGNITUDE] = norm.to(first.lora_magnitude_vector.dtype)
            state[part + A], state[part + B] = stacked, block
        changed[disk] = (rank, _number(first.scaling * (math.sqrt(rank) if first.rslora else rank)))
    return state, changed


@torch.no_grad()
def join_ia3(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` (our names) with each fused module's parts in joined form; a feed-forward vector that
    differs between the parts (or leaves one out) cannot be written as PEFT's one vector: an error."""
    state, layers = dict(state), dict(ia3_layers(model))
    for disk, parts in fused_groups(model).items():
        adapted = [p for p in parts if p in layers]
        if not adapted:
            continue
        if any(layers[p].feedforward for p in adapted):
            first = layers[adapted[0]].ia3_l
            if len(adapted) < len(parts) or not all(layers[p].feedforward and torch.equal(layers[p].ia3_l, first)
                                                    for p in parts):
                raise ValueError(f"(IA)³ on {disk}: PEFT's one input-scaling vector there needs all of "
                                 f"{', '.join(p.rsplit('.', 1)[-1] for p in parts)} feed-forward with equal vectors")
            continue
        for part in parts:
            if part not in layers:
                layer = model.get_submodule(part)
                state[part + IA3] = torch.ones(layer.out_features, 1, dtype=_dense(layer).dtype)
    return state


@torch.no_grad()
def split_joined(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Joined-form tensors (our names, as `from_peft_keys` gives them) in the layout of the model's
    own per-part LoRA and (IA)³ layers: blocks undone, parts the model does not adapt dropped where
    their rows are zero (LoRA) or ones ((IA)³). Anything else is left for the shape check to report."""
    state, loras, ia3s = dict(state), dict(lora_layers(model)), dict(ia3_layers(model))
    for parts in fused_groups(model).values():
        if parts[0] + A in state and any(p in loras for p in parts):
            _split_lora(state, parts, loras)
        elif parts[0] + IA3 in state and any(p in ia3s for p in parts):
            drop = [p for p in parts if p not in ia3s]
            if all(bool((state[p + IA3] == 1).all()) for p in drop):
                for part in drop:
                    del state[part + IA3]
    return state


def _split_lora(state: dict[str, Tensor], parts: tuple[str, ...], layers: dict[str, nn.Module]) -> None:
    adapted = [p for p in parts if p in layers]
    stacked = state[parts[0] + A]
    rank = stacked.shape[0]
    if all(p in layers and layers[p].r == rank for p in parts) or sum(layers[p].r for p in adapted) != rank:
        return  # the shared form, or shapes the check reports
    first, offset, blocks = layers[adapted[0]], 0, {}
    for part in parts:
        width = layers[part].r if part in layers else 0
        b = state[part + B]
        outside = b.clone()
        outside[:, offset : offset + width] = 0
        if outside.any():
            return  # not block form
        blocks[part] = (offset, width)
        offset += width
    for part in parts:
        (offset, width), b = blocks[part], state.pop(part + B)
        del state[part + A]
        if part in layers:
            state[part + A] = stacked[offset : offset + width]
            state[part + B] = b[:, offset : offset + width] * (first.scaling / layers[part].scaling)
        else:
            state.pop(part + MAGNITUDE, None)
