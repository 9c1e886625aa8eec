"""Selective fine-tuning: train only chosen parameter groups, freeze the rest."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

GROUPS = {  # shorthand names usable in place of a pattern
    "norms": r"norm\.(weight|bias)$",
    "biases": r"\.bias$",
    "embeddings": r"^model\.embed_(tokens|positions)\.",
    "head": r"^lm_head\.",
}


def train_only(model: nn.Module, patterns: Sequence[str] = (), layers: Sequence[int] = ()) -> int:
    """Make trainable exactly the parameters whose name matches one of `patterns` (regexes searched
    in the name, or a group: norms, biases, embeddings, head) or that belong to a block in `layers`
    (indices; negative ones count from the last block). Returns the number of trainable values."""
    if not patterns and not layers:
        raise ValueError("selective fine-tuning needs parameter patterns and/or layer indices to train")
    count = len(model.model.layers)
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a model of {count} layers")
    prefixes = tuple(f"model.layers.{i % count}." for i in layers)
    try:
        regexes = [re.compile(GROUPS.get(p, p)) for p in patterns]
    except re.error as e:
        raise ValueError(f"invalid parameter pattern {e.pattern!r}: {e}") from None
    named = list(model.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    for pattern, regex in zip(patterns, regexes):
        if not any(regex.search(name) for name, _ in named):
            raise ValueError(f"pattern {pattern!r} matches no parameter of the model")
    chosen: dict[int, bool] = {}
    for name, p in named:
        chosen[id(p)] = chosen.get(id(p), False) or name.startswith(prefixes) or any(r.search(name) for r in regexes)
    for p in model.parameters():
        p.requires_grad_(chosen[id(p)])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
