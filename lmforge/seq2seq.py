"""Encoder-decoder transformers: the T5 family (T5 v1.0, T5 v1.1, FLAN-T5) and T5's encoder alone.

Pre-norm blocks with T5's RMS norm (no mean, no bias: model.py's `RMSNorm`), attention without the
1/sqrt(d) scaling of its logits and with learned relative-position biases instead of positions: only the
first block of each stack holds the bias table, bucketed bidirectionally in the encoder and causally in the
decoder, and the other blocks reuse its biases. Decoder blocks attend to the encoder's output in between.
The MLP is ReLU (`wi`, `wo`) or gated (`wi_0`, `wi_1`, `wo`). v1.0 ties the head to the shared embeddings and
scales the decoder output by d_model**-0.5 before it. Module names are transformers' checkpoint names
(`shared`, `encoder.block.0.layer.0.SelfAttention.q`, ..., `lm_head`), so weights load as they are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch import Tensor, nn

from lmforge.config import explain
from lmforge.families import SEQ2SEQ_SPELLINGS, seq2seq_family_of
from lmforge.families.t5 import FEED_FORWARD_ACTIVATIONS
from lmforge.io import read_config_json
from lmforge.kv_cache import KVCache
from lmforge.model import RMSNorm



def gelu_new(x: Tensor) -> Tensor:
    """The tanh approximation of GELU, written out as T5 and transformers compute it (`gelu_new`): torch's
    fused `gelu(approximate="tanh")` rounds differently, ~1e-5 relative, which FLAN-T5's large logits show."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": gelu_new, "silu": F.silu}


class Seq2SeqConfig(BaseModel):
    """Everything the encoder-decoder needs, in `ModelConfig`'s names where the meaning is the same
    (transformers' T5Config aliases them too: hidden_size = d_model, head_dim = d_kv, ...)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    family: Literal["t5"] = "t5"
    vocab_size: int = 32128
    hidden_size: int = 512  # d_model
    head_dim: int = 64  # d_kv: independent of hidden_size / num_attention_heads
    intermediate_size: int = 2048  # d_ff
    num_hidden_layers: int = 6  # num_layers: the encoder's blocks
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_attention_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # "relu" (v1.0), "gated-gelu" (v1.1, FLAN-T5: tanh GELU), ...
    dropout_rate: float = 0.1  # in training mode only
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = True  # the head is the shared embedding matrix (v1.0)
    scale_decoder_outputs: bool | None = None  # decoder output times d_model**-0.5 before the head; None: if tied
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int = 0  # the decoder's first input (T5: the pad token)
    initializer_factor: float = 1.0
    torch_dtype: str = "float32"

    @model_validator(mode="after")
    def _check(self) -> Seq2SeqConfig:
        # Derived values are not marked as set, so a preset with overrides derives them afresh.
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_hidden_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        if self.feed_forward_proj not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not one of "
                             f"{', '.join(FEED_FORWARD_ACTIVATIONS)}")
        return self

    @property
    def gated_mlp(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The MLP's activation as transformers names it (`gated-gelu` is tanh GELU, `gelu_new`)."""
        return FEED_FORWARD_ACTIVATIONS[self.feed_forward_proj]

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> Seq2SeqConfig:
        """Read a transformers `config.json` dict of an encoder-decoder family (`lmforge.families`)."""
        family = seq2seq_family_of(hf, source)
        fields = SEQ2SEQ_SPELLINGS[family].read(hf, source)
        fields["torch_dtype"] = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        try:
            return cls(family=family, **fields)
        except ValidationError as e:
            raise ValueError(f"{source}: {explain(e, cls)}") from None

    def to_hf(self, *, encoder_only: bool = False) -> dict[str, Any]:
        """transformers' `config.json` (of `T5EncoderModel` when `encoder_only`)."""
        return SEQ2SEQ_SPELLINGS[self.family].write(self, encoder_only=encoder_only)

    @classmethod
    def from_dir(cls, path: str | Path) -> Seq2SeqConfig:
        """Read `config.json` from an HF model directory."""
        hf, source = read_config_json(path)
        return cls.from_hf(hf, source=source)


def relative_position_bucket(relative: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position (key position - query position). Bidirectional: half the
    buckets for keys after the query; causal: keys after the query share bucket 0. Of the remaining buckets,
    half count exact distances, half grow logarithmically up to `max_distance`, beyond which all share one."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # The same float32 operations, in the same order, as Mesh TensorFlow and transformers: the truncation
    # to an integer bucket must agree. Distances below `exact` take the other branch (clamp avoids log 0).
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


def additive_mask(allowed: Tensor, bias: Tensor) -> Tensor:
    """`bias` where attention is allowed, the dtype's lowest value elsewhere (an additive float mask for SDPA)."""
    return torch.where(allowed, bias, torch.finfo(bias.dtype).min)


class T5Attention(nn.Module):
    """Multi-head attention with unscaled logits plus an additive bias (relative positions and masks)."""

    def __init__(self, config: Seq2SeqConfig, *, relative_bias: bool = False) -> None:
        super().__init__()
        self.config = config
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        inner = self.n_heads * self.head_dim
        self.q = nn.Linear(config.hidden_size, inner, bias=False)
        self.k = nn.Linear(config.hidden_size, inner, bias=False)
        self.v = nn.Linear(config.hidden_size, inner, bias=False)
        self.o = nn.Linear(inner, config.hidden_size, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, self.n_heads)

    def position_bias(self, start: int, q_len: int, k_len: int, *, bidirectional: bool) -> Tensor:
        """(1, heads, q_len, k_len) biases of queries at positions start.. over keys at 0..k_len-1."""
        device = self.relative_attention_bias.weight.device
        queries = start + torch.arange(q_len, device=device)
        relative = torch.arange(k_len, device=device)[None, :] - queries[:, None]
        buckets = relative_position_bucket(
            relative, bidirectional=bidirectional, num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, heads x head_dim) -> (B, heads, T, head_dim)."""
        return x.view(*x.shape[:2], self.n_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.k(x)), self.heads(self.v(x))

    def forward(self, x: Tensor, bias: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of `x`'s queries over keys `k` and values `v` (B, heads, K, head_dim)."""
        dropout = self.config.dropout_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(self.heads(self.q(x)), k, v, attn_mask=bias.to(x.dtype),
                                           dropout_p=dropout, scale=1.0)
        return self.o(y.transpose(1, 2).reshape(*x.shape[:2], -1))


class DenseActDense(nn.Module):
    """T5 v1.0's MLP: wo(act(wi(x)))."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.wi = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act, self.dropout = ACTIVATIONS[config.activation], nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(self.act(self.wi(x))))


class DenseGatedActDense(nn.Module):
    """T5 v1.1's gated MLP: wo(act(wi_0(x)) * wi_1(x))."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.wi_1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act, self.dropout = ACTIVATIONS[config.activation], nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(self.act(self.wi_0(x)) * self.wi_1(x)))


class SelfAttentionLayer(nn.Module):
    def __init__(self, config: Seq2SeqConfig, relative_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, relative_bias=relative_bias)
        self.layer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor, bias: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        h = self.layer_norm(x)
        k, v = self.SelfAttention.keys_values(h)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return x + self.dropout(self.SelfAttention(h, bias, k, v))


class CrossAttentionLayer(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor, bias: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), bias, k, v))


class FeedForwardLayer(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.DenseReluDense = DenseGatedActDense(config) if config.gated_mlp else DenseActDense(config)
        self.layer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class Block(nn.Module):
    """Self-attention, (in the decoder) cross-attention over the encoder output, then the MLP: `layer.0..2`."""

    def __init__(self, config: Seq2SeqConfig, index: int, *, decoder: bool) -> None:
        super().__init__()
        self.index = index
        self.layer = nn.ModuleList([SelfAttentionLayer(config, relative_bias=index == 0)])
        if decoder:
            self.layer.append(CrossAttentionLayer(config))
        self.layer.append(FeedForwardLayer(config))

    def forward(self, x: Tensor, bias: Tensor, cache: KVCache | None = None,
                cross: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """`cross`: (bias, keys, values) of the encoder output, for a decoder block."""
        x = self.layer[0](x, bias, cache, self.index)
        if cross is not None:
            x = self.layer[1](x, *cross)
        return self.layer[-1](x)


class Stack(nn.Module):
    """The encoder's or the decoder's blocks and final norm (the embeddings are the model's `shared`)."""

    def __init__(self, config: Seq2SeqConfig, *, decoder: bool) -> None:
        super().__init__()
        self.is_decoder = decoder
        layers = config.num_decoder_layers if decoder else config.num_hidden_layers
        self.block = nn.ModuleList(Block(config, i, decoder=decoder) for i in range(layers))
        self.final_layer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout_rate)

    def position_bias(self, start: int, q_len: int, k_len: int) -> Tensor:
        attention = self.block[0].layer[0].SelfAttention
        return attention.position_bias(start, q_len, k_len, bidirectional=not self.is_decoder)

    def forward(self, x: Tensor, bias: Tensor, cache: KVCache | None = None,
                cross: list[tuple[Tensor, Tensor, Tensor]] | None = None) -> Tensor:
        x = self.dropout(x)
        for i, block in enumerate(self.block):
            x = block(x, bias, cache, None if cross is None else cross[i])
        return self.dropout(self.final_layer_norm(x))


class Seq2SeqCache(KVCache):
    """The decoder's self-attention keys and values (a `KVCache` over the decoder layers: every row shares
    one write position, as all rows start at the same decoder-start token), plus what a request fixes
    once: each layer's cross-attention keys and values over the encoder output, and its padding mask."""

    def __init__(self, config: Seq2SeqConfig, batch_size: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (config.num_decoder_layers, batch_size, config.num_attention_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.length, self.virtual_tokens = max_len, 0, None
        self.cross: list[tuple[Tensor, Tensor]] = []  # per decoder layer: (B, heads, S, head_dim) keys, values
        self.encoder_mask: Tensor | None = None  # (B, S) True at real encoder tokens; None: no padding

    def keep_rows(self, rows: Tensor) -> None:
        super().keep_rows(rows)
        self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask.index_select(0, rows)


class Seq2SeqEncoder(nn.Module):
    """T5's encoder alone (`T5EncoderModel`): `shared` embeddings and the `encoder` stack."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = Stack(config, decoder=False)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder hidden states (B, S, D); `attention_mask` (B, S) is 1 at real tokens, 0 at padding."""
        return self.encode_embeddings(self.shared(input_ids), attention_mask)

    def encode_embeddings(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder hidden states (B, S, D) of input embeddings `x` (B, S, D), e.g. with a soft prompt before them."""
        S = x.shape[1]
        bias = self.encoder.position_bias(0, S, S)
        if attention_mask is not None:
            bias = additive_mask(attention_mask[:, None, None, :].bool(), bias)
        return self.encoder(x, bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.encode(input_ids, attention_mask)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def init_weights(self, seed: int | None = None) -> None:
        """T5's initialisation: normal with std (fan-in)**-0.5 for projections (queries also divided by
        sqrt(head_dim)), 1 for embeddings and an untied head, d_model**-0.5 for the bias tables; unit norms."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        c = self.config
        d, inner = c.hidden_size, c.num_attention_heads * c.head_dim
        stds = {"q": (d * c.head_dim) ** -0.5, "k": d**-0.5, "v": d**-0.5, "o": inner**-0.5, "wi": d**-0.5,
                "wi_0": d**-0.5, "wi_1": d**-0.5, "wo": c.intermediate_size**-0.5,
                "relative_attention_bias": d**-0.5, "shared": 1.0, "lm_head": 1.0}
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(c.initializer_factor)
                    continue
                std = c.initializer_factor * stds[name.split(".")[-2]]
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)


class Seq2SeqLM(Seq2SeqEncoder):
    """T5 with its decoder and language-model head (`T5ForConditionalGeneration`)."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__(config)
        self.decoder = Stack(config, decoder=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def new_cache(self, batch_size: int, max_len: int) -> Seq2SeqCache:
        """An empty decoder cache for `batch_size` rows of up to `max_len` decoder tokens."""
        param = self.shared.weight
        return Seq2SeqCache(self.config, batch_size, max_len, dtype=param.dtype, device=param.device)

    def cross_attention(self, encoder_hidden: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each decoder layer's cross-attention keys and values over the encoder output."""
        return [block.layer[1].EncDecAttention.keys_values(encoder_hidden) for block in self.decoder.block]

    def decode(self, decoder_input_ids: Tensor, cross: list[tuple[Tensor, Tensor]],
               encoder_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Decoder hidden states (B, T, D) given the cross-attention keys and values; `cache` holds the
        earlier decoder tokens' keys and values and advances by T."""
        x = self.shared(decoder_input_ids)
        T = x.shape[1]
        start = int(cache.length) if cache is not None else 0
        bias = self.decoder.position_bias(start, T, start + T)
        q = start + torch.arange(T, device=x.device)
        bias = additive_mask(torch.arange(start + T, device=x.device)[None, :] <= q[:, None], bias)
        cross_bias = x.new_zeros(1, 1, 1, cross[0][0].shape[2])
        if encoder_mask is not None:
            cross_bias = additive_mask(encoder_mask[:, None, None, :].bool(), cross_bias)
        hidden = self.decoder(x, bias, cache, [(cross_bias, k, v) for k, v in cross])
        if cache is not None:
            cache.advance(T)
        return hidden

    def forward(self, input_ids: Tensor | None, decoder_input_ids: Tensor, *, attention_mask: Tensor | None = None,
                encoder_hidden: Tensor | None = None, cache: Seq2SeqCache | None = None) -> Tensor:
        """Logits (B, T, V) of the decoder inputs. The encoder runs on `input_ids` unless `encoder_hidden` is
        given, or `cache` already holds the cross-attention keys and values (filled at its first forward,
        with the padding mask `attention_mask`, which later calls then need not repeat)."""
        if cache is not None and cache.cross:
            cross, mask = cache.cross, cache.encoder_mask
        else:
            if encoder_hidden is None:
                if input_ids is None:
                    raise ValueError("give input_ids or encoder_hidden (or a cache holding the encoder's keys)")
                encoder_hidden = self.encode(input_ids, attention_mask)
            cross, mask = self.cross_attention(encoder_hidden), attention_mask
            if cache is not None:
                cache.cross, cache.encoder_mask = cross, mask
        hidden = self.decode(decoder_input_ids, cross, mask, cache)
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.hidden_size**-0.5
        return self.lm_head(hidden)


def shift_right(labels: Tensor, config: Seq2SeqConfig) -> Tensor:
    """Decoder inputs for teacher forcing: the labels one step later, after the decoder-start token; ignored
    positions (-100) become the pad token (T5's `_shift_right`)."""
    shifted = torch.full_like(labels, config.decoder_start_token_id)
    shifted[..., 1:] = labels[..., :-1]
    return shifted.masked_fill(shifted == -100, config.pad_token_id if config.pad_token_id is not None else 0)
