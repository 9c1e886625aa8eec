"""Trainable token rows (PEFT's `trainable_token_indices`): the embedding and output rows of a few
chosen tokens train while the rest of both matrices stays frozen.

A chat template's markers (`<|im_start|>`, `<|im_end|>`) never occur in pretraining, so their rows
are still at their random initialisation; LoRA on the blocks alone cannot give `<|im_end|>` a
confident probability, and sampled replies then run on past the answer. Training those rows fixes
that at the cost of a few vectors. The rows live in `<layer>.token_adapter.trainable_tokens_delta`
(PEFT's name; it holds the new rows, not a difference); with tied embeddings the output layer
shares the embedding's rows, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model import ScaledEmbedding

EMBED, HEAD = "model.embed_tokens", "lm_head"  # the input embedding and the output layer, by our names
LAYERS = (EMBED, HEAD)


class TokenRows(nn.Module):
    """The trainable rows, one per token of `token_indices`."""

    def __init__(self, rows: Tensor) -> None:
        super().__init__()
        self.trainable_tokens_delta = nn.Parameter(rows.detach().clone())


class TrainableTokens(nn.Module):
    """An embedding or linear output layer whose rows `token_indices` come from `token_adapter`.
    The base weight keeps its name (`embed_tokens.weight`) and stays frozen; `disabled` computes the base."""

    def __init__(self, base: nn.Embedding | nn.Linear, token_indices: Sequence[int],
                 token_adapter: TokenRows | None = None) -> None:
        super().__init__()
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable tokens need an nn.Embedding or nn.Linear, got {type(base).__name__}")
        vocab = base.weight.shape[0]
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = getattr(base, "bias", None)
        self.padding_idx = getattr(base, "padding_idx", None)
        self.embedding = isinstance(base, nn.Embedding)
        self.scale = base.scale if isinstance(base, ScaledEmbedding) else None  # Gemma's sqrt(hidden) factor
        self.token_indices = list(token_indices)
        index = torch.tensor(self.token_indices, device=base.weight.device)
        self.register_buffer("index", index, persistent=False)
        slots = torch.full((vocab,), -1, dtype=torch.long, device=base.weight.device)
        slots[index] = torch.arange(len(index), device=base.weight.device)
        self.register_buffer("slots", slots, persistent=False)  # token id -> its row, or -1
        self.token_adapter = token_adapter or TokenRows(base.weight[index])
        self.disabled = False

    @property
    def rows(self) -> Tensor:
        return self.token_adapter.trainable_tokens_delta

    def forward(self, x: Tensor) -> Tensor:
        if self.embedding:
            out = F.embedding(x, self.weight, self.padding_idx)
            if not self.disabled:
                slot = self.slots[x]
                # F.embedding, not rows[slot]: indexing's backward accumulates in a thread-dependent order
                # on CPU, and training must give the same weights run after run.
                out = torch.where((slot >= 0)[..., None], F.embedding(slot.clamp(min=0), self.rows.to(out.dtype)), out)
            return out if self.scale is None else out * self.scale()
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        bias = None if self.bias is None else self.bias[self.index]
        return out.index_copy(-1, self.index, F.linear(x, self.rows.to(x.dtype), bias).to(out.dtype))

    def merged_weight(self) -> Tensor:
        """The base weight with the trained rows in place."""
        return self.weight.detach().index_copy(0, self.index, self.rows.detach().to(self.weight.dtype))

    def extra_repr(self) -> str:
        return f"tokens={self.token_indices}, {'embedding' if self.embedding else 'linear'}"


def tied(model: nn.Module) -> bool:
    return model.get_submodule(HEAD).weight is model.get_submodule(EMBED).weight


def layer_indices(model: nn.Module, token_indices: Sequence[int] | dict[str, Sequence[int]]) -> dict[str, list[int]]:
    """Which rows train in which layer, by PEFT's rule: a list selects rows of the input embedding;
    a dict names the layers (`{"embed_tokens": [...], "lm_head": [...]}`). A tied output layer
    always uses the embedding's rows."""
    if not isinstance(token_indices, dict):
        chosen = {EMBED: list(token_indices)}
    else:
        short = {name.rsplit(".", 1)[-1]: name for name in LAYERS}
        unknown = set(token_indices) - set(short)
        if unknown:
            raise ValueError(f"trainable_token_indices names {sorted(unknown)}; "
                             "the layers are embed_tokens and lm_head")
        chosen = {short[k]: list(v) for k, v in token_indices.items() if v}
    if tied(model):
        rows = chosen.get(EMBED) or chosen.get(HEAD, [])
        chosen = {EMBED: rows, HEAD: rows}
    for name, indices in chosen.items():
        vocab = model.get_submodule(name).weight.shape[0]
        if any(not 0 <= i < vocab for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"trainable token indices must be distinct ids in [0, {vocab}), got {indices}")
    return {name: chosen[name] for name in LAYERS if chosen.get(name)}


def input_and_output(model: nn.Module, token_ids: Sequence[int]) -> list[int] | dict[str, list[int]]:
    """`token_ids` for both the input embedding and the output layer, in PEFT's form for this model."""
    return list(token_ids) if tied(model) else {"embed_tokens": list(token_ids), "lm_head": list(token_ids)}


def expected_token_state(model: nn.Module, token_indices: Sequence[int] | dict[str, Sequence[int]]
                         ) -> dict[str, tuple[int, int]]:
    """The shapes of the rows `add_trainable_tokens(model, token_indices)` would add, by our names."""
    layers = layer_indices(model, token_indices)
    if tied(model):
        layers.pop(HEAD, None)  # shares the embedding's rows
    return {f"{name}.token_adapter.trainable_tokens_delta": (len(ids), model.get_submodule(name).weight.shape[1])
            for name, ids in layers.items()}


def add_trainable_tokens(model: nn.Module, token_indices: Sequence[int] | dict[str, Sequence[int]]) -> nn.Module:
    """Make rows of the input embedding and/or the output layer trainable, as `layer_indices` reads
    `token_indices` (in place; returns `model`)."""
    if any(token_layers(model)):
        raise ValueError("the model already has trainable tokens")
    shared, share = None, tied(model)
    for name, indices in layer_indices(model, token_indices).items():
        wrapped = TrainableTokens(model.get_submodule(name), indices, shared if share else None)
        shared = wrapped.token_adapter
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
    return model


def token_layers(model: nn.Module) -> Iterator[tuple[str, TrainableTokens]]:
    for name, m in model.named_modules():
        if isinstance(m, TrainableTokens):
            yield name, m


def peft_token_indices(model: nn.Module) -> list[int] | dict[str, list[int]] | None:
    """`trainable_token_indices` as PEFT writes it: a list when the weights are tied, else per layer."""
    layers = dict(token_layers(model))
    if not layers:
        return None
    embed, head = layers.get(EMBED), layers.get(HEAD)
    if embed is not None and head is not None and head.token_adapter is embed.token_adapter:
        return embed.token_indices
    return {name.rsplit(".", 1)[-1]: m.token_indices for name, m in layers.items()}


def token_state(model: nn.Module) -> dict[str, Tensor]:
    """The trained rows under our names (a tied output layer's shared rows once)."""
    state, seen = {}, set()
    for name, m in token_layers(model):
        if id(m.token_adapter) not in seen:
            seen.add(id(m.token_adapter))
            state[f"{name}.token_adapter.trainable_tokens_delta"] = m.rows
    return state


@torch.no_grad()
def merge_tokens_and_unload(model: nn.Module) -> nn.Module:
    """Replace each `TrainableTokens` by a plain layer holding the merged weight (ties kept)."""
    merged: dict[int, nn.Parameter] = {}
    for name, m in list(token_layers(model)):
        key = id(m.weight)
        if key not in merged:
            merged[key] = nn.Parameter(m.merged_weight(), requires_grad=False)
        if m.embedding:  # Gemma's embedding keeps its sqrt(hidden) factor
            kind = nn.Embedding if m.scale is None else ScaledEmbedding
            plain: nn.Module = kind(*m.weight.shape, padding_idx=m.padding_idx, device="meta")
        else:
            plain = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None, device="meta")
            if m.bias is not None:
                plain.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        plain.weight = merged[key]
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, plain.train(m.training))
    return model
