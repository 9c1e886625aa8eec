"""Preallocated key/value caches for all layers (gpt-fast's static cache)."""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.config import ModelConfig


STATIC_SHAPE = "a static KV cache (a compiled engine's) keeps its rows and slots: batch continuously without compile"


class KVCache:
    """Keys and values of every layer, (layers, batch, kv_heads, max_len, head_dim), filled left to right.

    All rows share one write position (prompts are left-padded to a common length), so a step
    writes one slice and attention reads the filled prefix. A soft-prompted model puts its virtual
    tokens first in every row (after the padding) at prefill: `virtual_tokens` is None until then."""

    static = False

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length: int | Tensor = 0
        self.virtual_tokens: int | None = None

    def attended(self, n: int) -> int:
        """How many key slots a forward of `n` new tokens attends over."""
        return self.length + n

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's (B, kv_heads, T, D) keys and values; return everything cached so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens exceed its {self.max_len} slots")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions as filled (called once per forward, after all layers)."""
        self.length += n

    def add_virtual_tokens(self, n: int) -> None:
        """Grow every row by `n` slots for a soft prompt's virtual tokens (callers size caches for
        their own tokens) and record that the prompt is in; once per cache, before its first forward."""
        if self.virtual_tokens is not None:
            raise ValueError(f"the cache already holds a soft prompt of {self.virtual_tokens} virtual tokens")
        if n:
            extra = (*self.k.shape[:3], n, self.k.shape[4])
            self.k = torch.cat((self.k, self.k.new_zeros(extra)), dim=3)
            self.v = torch.cat((self.v, self.v.new_zeros(extra)), dim=3)
            self.max_len += n
        self.virtual_tokens = n

    # ---- reshaping between steps (continuous batching) --------------------------------------------

    def reserve(self, n: int, chunk: int = 64) -> None:
        """Make room for `n` more positions, growing by at least `chunk` slots at a time."""
        if self.length + n <= self.max_len:
            return
        grown = self.length + max(n, chunk)
        self.k, self.v = (self._resized(t, grown) for t in (self.k, self.v))
        self.max_len = grown

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only these batch rows (a (B',) index tensor), in this order."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)

    def drop_left(self, n: int) -> None:
        """Forget the first `n` slots of every row (slots no row attends to any more)."""
        if n:
            self.k, self.v = self.k[:, :, :, n:], self.v[:, :, :, n:]
            self.length -= n
            self.max_len -= n

    @classmethod
    def stack(cls, first: KVCache, second: KVCache) -> tuple[KVCache, int, int]:
        """One cache holding `first`'s rows then `second`'s, right-aligned so that both end at the
        longer one's length. Returns it and the left padding each input's rows gained."""
        if first.static or second.static:
            raise TypeError(STATIC_SHAPE)
        length = max(first.length, second.length)
        merged = cls.__new__(cls)
        shape = list(first.k.shape)
        shape[1] = first.k.shape[1] + second.k.shape[1]
        shape[3] = length + max(first.max_len - first.length, second.max_len - second.length)
        merged.k = first.k.new_zeros(shape)
        merged.v = first.v.new_zeros(shape)
        rows = first.k.shape[1]
        for source, part in ((first, slice(0, rows)), (second, slice(rows, None))):
            at = length - source.length
            merged.k[:, part, :, at:length] = source.k[:, :, :, : source.length]
            merged.v[:, part, :, at:length] = source.v[:, :, :, : source.length]
        merged.max_len, merged.length = shape[3], length
        merged.virtual_tokens = first.virtual_tokens  # both were prefilled by the same model
        return merged, length - first.length, length - second.length

    def _resized(self, t: Tensor, slots: int) -> Tensor:
        out = t.new_zeros(*t.shape[:3], slots, t.shape[4])
        out[:, :, :, : self.length] = t[:, :, :, : self.length]
        return out


class StaticKVCache(KVCache):
    """The same cache with shapes that never change, for `torch.compile`: the write position is a
    tensor and attention reads every slot, the unfilled ones masked out. Each layer's keys and values
    are a tensor of their own, (batch, kv_heads, max_len, head_dim): a compiled step writes its slot
    in place, where a write into a slice of one tensor for all layers copied that whole tensor."""

    static = True

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.virtual_tokens = None

    def attended(self, n: int) -> int:
        return self.max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        slots = self.length + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        self.length.add_(n)

    def keep_rows(self, rows: Tensor) -> None:
        raise TypeError(STATIC_SHAPE)

    def drop_left(self, n: int) -> None:
        raise TypeError(STATIC_SHAPE)

    def add_virtual_tokens(self, n: int) -> None:
        if self.virtual_tokens is not None:
            raise ValueError(f"the cache already holds a soft prompt of {self.virtual_tokens} virtual tokens")
        if n:
            self.k, self.v = ([torch.cat((t, t.new_zeros(*t.shape[:2], n, t.shape[3])), dim=2) for t in ts]
                              for ts in (self.k, self.v))
            self.max_len += n
        self.virtual_tokens = n
