"""How Gemma, Gemma 2, Gemma 3 (text) and Qwen3 (dense and MoE) spell their `config.json`: the
ModelConfig fields each switches on when read, and the family-specific keys written back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.config import ModelConfig

MODEL_TYPES: dict[str, str] = {"gemma3": "gemma3_text"}  # config.json's model_type where it is not the family
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")


def hf_rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` of the (global) rotary embedding."""
    return {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}


def gate_activation(family: str, hf: dict[str, Any], source: str) -> str:
    """The gated MLP's activation: `hidden_act` (Gemma 2/3: `hidden_activation`); silu or tanh GELU."""
    key = "hidden_activation" if family in ("gemma2", "gemma3") else "hidden_act"
    act = hf.get(key) or "silu"
    if family == "gemma" and act == "gelu":  # old Gemma configs mean the tanh approximation, as transformers reads them
        act = "gelu_pytorch_tanh"
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise ValueError(f"{source}: {key} {act!r} is not supported (silu, gelu_pytorch_tanh)")
    return act


def gemma_qwen3_fields(family: str, hf: dict[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig fields that Gemma, Gemma 2/3, Qwen3 and Qwen3-MoE configs switch on (none for others)."""
    fields: dict[str, Any] = {}
    if family in GEMMA_FAMILIES:
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{source}: use_bidirectional_attention=true is not supported")
        tied = hf.get("tie_word_embeddings", True)
        fields.update(norm_offset=True, scale_embeddings=True, tie_word_embeddings=tied)
    if family in ("gemma2", "gemma3"):
        sliding = hf.get("sliding_window", 4096)
        pattern = 2 if family == "gemma2" else hf.get("sliding_window_pattern", 6)
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])
        ]
        fields.update(post_norms=True, query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                      sliding_window=sliding, layer_types=layer_types if sliding is not None else None,
                      final_logit_softcapping=hf.get("final_logit_softcapping", 30.0 if family == "gemma2" else None))
    if family == "gemma2":
        fields["attn_logit_softcapping"] = hf.get("attn_logit_softcapping", 50.0)
    if family == "gemma3":  # transformers' Gemma 3 attention never soft-caps its scores
        nested = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
        if nested.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters.sliding_attention must be of rope_type default")
        fields["rope_local_base_freq"] = nested.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
        if "rope_theta" not in hf and "full_attention" not in (hf.get("rope_parameters") or {}):
            fields["rope_theta"] = 1_000_000.0
    if family in ("qwen3", "qwen3_moe", "gemma3"):
        fields["qk_norm"] = True
    if family == "qwen3_moe":
        # transformers 5 writes num_local_experts (an alias), the published configs num_experts
        fields.update(num_experts=hf.get("num_local_experts", hf.get("num_experts", 128)),
                      num_experts_per_tok=hf.get("num_experts_per_tok", 8),
                      moe_intermediate_size=hf.get("moe_intermediate_size", 768),
                      norm_topk_prob=hf.get("norm_topk_prob", False),
                      decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                      mlp_only_layers=hf.get("mlp_only_layers") or [])
    return fields


def gemma_qwen3_hf(config: ModelConfig) -> dict[str, Any]:
    """config.json fields of Gemma, Gemma 2/3, Qwen3 and Qwen3-MoE beyond the Llama-style ones."""
    family = config.family
    hf: dict[str, Any] = dict(attention_bias=config.attention_bias, model_type=MODEL_TYPES.get(family, family))
    layer_types = config.layer_types or ["full_attention"] * config.num_hidden_layers
    if config.family in ("qwen3", "qwen3_moe"):
        hf.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window)
        hf.update(layer_types=layer_types, max_window_layers=config.num_hidden_layers)
    if config.family == "qwen3_moe":
        hf.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                  moe_intermediate_size=config.moe_intermediate_size or config.intermediate_size,
                  norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=config.decoder_sparse_step,
                  mlp_only_layers=config.mlp_only_layers, output_router_logits=False)
    if config.family in ("gemma2", "gemma3"):
        hf.update(hidden_activation=config.hidden_act,
                  query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
                  sliding_window=config.sliding_window, layer_types=layer_types,
                  attn_logit_softcapping=config.attn_logit_softcapping,
                  final_logit_softcapping=config.final_logit_softcapping)
    if config.family == "gemma3":
        local = {"rope_type": "default", "rope_theta": config.rope_local_base_freq or config.rope_theta}
        hf.update(rope_parameters={"full_attention": hf_rope_parameters(config), "sliding_attention": local},
                  rope_local_base_freq=local["rope_theta"], rope_scaling=None)
    return hf
