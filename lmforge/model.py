"""One decoder-only transformer for every supported family, switched by config fields.

Llama/Mistral/Qwen2/Mixtral: RMSNorm pre-normalisation, rotary embeddings, grouped-query
attention, SwiGLU (or a sparse mixture of SwiGLU experts). GPT-2: LayerNorm, learned positions,
GELU, biases. Gemma adds a GeGLU MLP, offset norms and scaled embeddings; Gemma 2/3 norms after
attention and MLP too, soft-capping and per-layer-type RoPE; Qwen3 and Gemma 3 normalise q and k per
head. Phi-3: partial rotary, LongRoPE. Falcon: attention and MLP in parallel off one or two norms.
BLOOM: ALiBi biases instead of positions, a norm after the embeddings. Module names follow
transformers' checkpoint names so Llama-layout weights load as is.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.positions import alibi_bias, alibi_slopes, apply_rope, rope_attention_scaling, rope_inv_freq

if TYPE_CHECKING:
    from lmforge.kv_cache import KVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementations."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: `x_normed * (1 + weight)`, all in float32; the weight is stored as an offset (init 0)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (default: the hidden size)."""
    dim = dim or config.hidden_size
    if config.norm == "rmsnorm":
        return OffsetRMSNorm(dim, config.norm_eps) if config.norm_offset else RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings multiplied by sqrt(hidden size), the factor cast to the weights' dtype (Gemma)."""

    def forward(self, input_ids: Tensor) -> Tensor:
        return super().forward(input_ids) * self.scale()

    def scale(self) -> Tensor:
        return torch.tensor(self.embedding_dim**0.5, dtype=torch.float32).to(self.weight.dtype)


def attention_mask(
    start: int | Tensor, q_len: int, k_len: int, pad: Tensor | None, window: int | None, device: torch.device,
    *, always: bool = False,
) -> Tensor | None:
    """Boolean (B|1, 1, q_len, k_len) mask for queries at cache slots start..start+q_len-1. None
    (unless `always`) when plain causal attention (`is_causal`), or no mask for one query, is exact."""
    if not always and pad is None and (window is None or start + q_len <= window) and (start == 0 or q_len == 1):
        return None
    q = (start + torch.arange(q_len, device=device))[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    if pad is None:
        return allowed[None, None]
    allowed = allowed[None] & (k[None] >= pad[:, None, None])
    return (allowed | (k == q)[None])[:, None]  # a padding query sees itself, so no row is empty (NaN)


def written_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float, softcap: float | None = None,
    as_sums: bool = False,
) -> Tensor:
    """`scaled_dot_product_attention` written out, with scores optionally soft-capped as
    `softcap * tanh(scores / softcap)` (Gemma 2; SDPA cannot cap). `mask` (boolean, True = attend) or `causal` as
    for SDPA. Each K/V head serves its group of query heads without being copied. `as_sums`: the two products as
    float32 sums of broadcast products, which inductor fuses with their neighbours (a compiled CPU decode step)."""
    B, H, T, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    q = q.reshape(B, kv_heads, H // kv_heads * T, D)
    if as_sums:
        scores = (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1).to(q.dtype)
    else:
        scores = q @ k.transpose(-1, -2)
    scores = scores.view(B, H, T, S) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).view(B, kv_heads, H // kv_heads * T, S)
    if as_sums:
        return (weights.unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2).to(q.dtype).view(B, H, T, D)
    return (weights.to(q.dtype) @ v).view(B, H, T, D)


def stacked_linear(*parts: nn.Linear) -> nn.Linear:
    """One linear layer computing `parts` (of the same input) at once: their outputs side by side."""
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight.data = weight
    if fused.bias is not None:
        fused.bias.data = torch.cat([p.bias.detach() for p in parts])
    fused.requires_grad_(parts[0].weight.requires_grad)
    return fused


def fuse_projections(model: nn.Module) -> None:
    """Fuse every attention's q/k/v and every gated MLP's gate/up projections whose layers are plain linears
    (not adapters or quantized layers): fewer, larger matrix-vector products when decoding. Inference only."""
    for module in model.modules():
        names = ("q_proj", "k_proj", "v_proj") if isinstance(module, Attention) else \
            ("gate_proj", "up_proj") if isinstance(module, SwiGLU) else ()
        if names and all(type(getattr(module, n, None)) is nn.Linear for n in names):
            module.fuse_projections()


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads, through scaled_dot_product_attention."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=config.attention_bias)
        # Gemma 2/3 and Qwen3: query scale, soft-capped scores, per-head norms of q and k.
        scalar = config.query_pre_attn_scalar or self.head_dim
        self.scale, self.softcap, self.qk_norm = scalar**-0.5, config.attn_logit_softcapping, config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = make_norm(config, self.head_dim), make_norm(config, self.head_dim)
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one (`fuse_projections`), for inference

    def fuse_projections(self) -> None:
        """Replace q_proj, k_proj and v_proj by one linear `qkv_proj` of their stacked weights: one matrix-vector
        product instead of three per decoding step. For inference: checkpoints and adapters name q, k and v."""
        self.qkv_proj = stacked_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split((self.n_heads * self.head_dim, *(2 * [self.n_kv * self.head_dim])), -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        causal = mask is None and T > 1 and T == k.shape[2]
        # In a compiled CPU decode step SDPA's kernel costs 40-150 us a call, the written-out form a few (at batch 1
        # as sums, fused; several rows measured faster through the batched products).
        compiled_step = T == 1 and x.device.type == "cpu" and torch.compiler.is_compiling()
        if self.softcap is not None or compiled_step:
            y = written_attention(q, k, v, mask, causal, self.scale, self.softcap, as_sums=compiled_step and B == 1)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads, scale=self.scale
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


GATE_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class SwiGLU(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SiLU gate (SwiGLU) or tanh-GELU gate (GeGLU, `hidden_act`)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = GATE_ACTIVATIONS[act]
        self.gate_up_proj: nn.Linear | None = None  # gate and up in one (`fuse_projections`), for inference

    def fuse_projections(self) -> None:
        """Replace gate_proj and up_proj by one linear `gate_up_proj` of their stacked weights (see
        `Attention.fuse_projections`)."""
        self.gate_up_proj = stacked_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class SparseMoE(nn.Module):
    """Top-k routed mixture of SwiGLU experts; the chosen experts' weights are renormalised (Mixtral)
    when `norm_topk_prob`, else left as softmax probabilities (Qwen3-MoE's default)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.renormalise = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        size = config.moe_intermediate_size or config.intermediate_size
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, size, config.mlp_bias, config.hidden_act) for _ in range(config.num_experts)
        )

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view_as(x)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); or, with `parallel_residual`,
    x + attn(norm(x)) + mlp(norm'(x)), norm' being the same norm under `shared_block_norm`."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.parallel, self.shared_norm = config.parallel_residual, config.shared_block_norm
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer)
        if not config.shared_block_norm:
            self.post_attention_layernorm = make_norm(config)
        self.local_rope = config.rope_local_base_freq is not None and config.is_sliding(layer)
        if config.is_sparse(layer):
            self.mlp: nn.Module = SparseMoE(config)
        elif config.mlp == "swiglu":
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias, config.hidden_act)
        else:
            self.mlp = GeluMLP(config.hidden_size, config.intermediate_size, config.mlp_bias, config.gelu_approximate)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        if self.parallel:
            h = self.input_layernorm(x)
            attn = self.self_attn(h, rope, mask, cache)
            return x + (self.mlp(h if self.shared_norm else self.post_attention_layernorm(x)) + attn)
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SandwichBlock(Block):
    """Gemma 2/3's block: norms before and after both attention and MLP (`post_norms`);
    `post_attention_layernorm` normalises the attention output here, not the MLP input."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer)
        self.pre_feedforward_layernorm = make_norm(config)
        self.post_feedforward_layernorm = make_norm(config)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Decoder(nn.Module):
    """Embeddings, blocks and the final norm: hidden states, no head (shared by LM and reward models)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        embedding = ScaledEmbedding if config.scale_embeddings else nn.Embedding
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        if config.embedding_norm:
            self.embed_layernorm = make_norm(config)
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        block = SandwichBlock if config.post_norms else Block
        self.layers = nn.ModuleList(block(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        if config.rope_local_base_freq is not None:  # the sliding-window layers' own RoPE table (Gemma 3)
            self.register_buffer("inv_freq_local", rope_inv_freq(config, local=True), persistent=False)
        self._register_position_buffers()
        self.windows = sorted({block.window for block in self.layers}, key=lambda w: w or 0)
        self.gradient_checkpointing = False  # recompute each block's activations in backward

    def _register_position_buffers(self, device: torch.device | str | None = None) -> None:
        """LongRoPE's long-context frequencies and ALiBi's slopes (None when not configured)."""
        config = self.config
        longrope = (config.rope_scaling or {}).get("rope_type") == "longrope"
        self.rope_scale = rope_attention_scaling(config)
        self.long_after = config.rope_scaling["original_max_position_embeddings"] if longrope else None
        long_freq = rope_inv_freq(config, long=True) if longrope else None
        slopes = alibi_slopes(config.num_attention_heads) if config.position == "alibi" else None
        for name, value in (("long_inv_freq", long_freq), ("alibi_slopes", slopes)):
            self.register_buffer(name, None if value is None else value.to(device), persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (after building on the meta device and materialising)."""
        device = device or self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.config).to(device)
        if self.config.rope_local_base_freq is not None:
            self.inv_freq_local = rope_inv_freq(self.config, local=True).to(device)
        self._register_position_buffers(device)

    def rotary(self, positions: Tensor, dtype: torch.dtype, *, local: bool = False) -> tuple[Tensor, Tensor]:
        """cos and sin (B, 1, T, rotary_dim) of each position's angles (`local`: the sliding layers' table)."""
        inv_freq = self.inv_freq_local if local else self.inv_freq
        if self.long_inv_freq is not None and not local:
            # LongRoPE as transformers 5.25 applies it (`longrope_frequency_update`): one set of factors for
            # the whole forward pass, the long ones once its largest position reaches original_max_position_
            # embeddings, the short ones otherwise; keys already cached keep the set they were rotated with.
            inv_freq = torch.where(positions.max() + 1 > self.long_after, self.long_inv_freq, self.inv_freq)
        freqs = positions[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = angles.cos(), angles.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        pad: Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Hidden states (B, T, D). `pad` (B,) counts left-padding tokens per row; `cache` holds
        earlier tokens' keys and values and advances by T."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.embedding_norm:
            x = self.embed_layernorm(x)
        B, T = x.shape[:2]
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = (start + torch.arange(T, device=x.device)).expand(B, T)
            if pad is not None:
                positions = (positions - pad[:, None]).clamp(min=0)
        rope = local_rope = None
        if self.config.position == "learned":
            x = x + self.embed_positions(positions)
        elif self.config.position == "rope":
            rope = local_rope = self.rotary(positions, x.dtype)
            if self.config.rope_local_base_freq is not None:
                local_rope = self.rotary(positions, x.dtype, local=True)
        k_len = cache.attended(T) if cache is not None else T
        always = (cache is not None and cache.static) or self.alibi_slopes is not None
        masks = {w: attention_mask(start, T, k_len, pad, w, x.device, always=always) for w in self.windows}
        if self.alibi_slopes is not None:
            masks = {w: alibi_bias(self.alibi_slopes, m, pad, x.dtype) for w, m in masks.items()}
        for block in self.layers:
            angles = local_rope if block.local_rope else rope
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, angles, masks[block.window], cache, use_reentrant=False)
            else:
                x = block(x, angles, masks[block.window], cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


class Transformer(nn.Module):
    """Causal language model: `model` (the decoder) and `lm_head`, named as in transformers."""

    num_virtual_tokens = 0  # positions a soft prompt puts before every sequence (`peft.PromptTuned`)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        pad: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, V) of the input tokens, or (B, 1, V) for the last position only."""
        embeds = self.input_embeddings(input_ids, positions=positions, pad=pad, cache=cache)
        hidden = self.model(input_ids, positions=positions, pad=pad, cache=cache, inputs_embeds=embeds)
        prefix = hidden.shape[1] - input_ids.shape[1]  # soft-prompt positions are never scored
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden[:, prefix:])
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def input_embeddings(
        self, input_ids: Tensor, *, positions: Tensor | None, pad: Tensor | None, cache: KVCache | None
    ) -> Tensor | None:
        """What the decoder reads instead of the embeddings of `input_ids` (None: those embeddings);
        a soft-prompted model puts its virtual tokens first here."""
        return None

    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms (zero offsets); residual output
        projections scaled by 1/sqrt(2 x layers) as in GPT-2."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            else:
                scale = std / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * scale)
        for module in self.modules():
            if isinstance(module, OffsetRMSNorm):  # computes x * (1 + weight): 0 is the unit gain
                nn.init.zeros_(module.weight)
        self.model.reset_buffers()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
