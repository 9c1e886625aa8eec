"""How the families beyond Llama spell `config.json`: Gemma, Gemma 2/3 and Qwen3 (dense, MoE) as
Llama-style configs with extra keys; Phi-3, Falcon and BLOOM in their own spellings. Read into
`ModelConfig` fields and written back (transformers-5 style, with the keys older readers look for).
Only spelling lives here; what the fields do is the decoder's business."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.config import ModelConfig

SPELLED_HERE = ("phi3", "falcon", "bloom")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
MODEL_TYPES: dict[str, str] = {"gemma3": "gemma3_text"}  # config.json's model_type where it is not the family
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
    (transformers 4, `type` or `rope_type`); the scaling is {} for plain RoPE. Of a RoPE per layer type
    (Gemma 3 in transformers 5), the full-attention layers'."""
    rope = hf.get("rope_parameters") or {}
    rope = rope.get("full_attention") or {k: v for k, v in rope.items() if k != "sliding_attention"}
    scaling = dict(hf.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    return theta, {} if scaling.get("rope_type", "default") == "default" else scaling


def fields_from_hf(family: str, hf: dict[str, Any], source: str) -> dict[str, Any]:
    """`ModelConfig` fields (less the token ids and dtype) from a Phi-3, Falcon or BLOOM config.json."""
    return {"phi3": _phi3_fields, "falcon": _falcon_fields, "bloom": _bloom_fields}[family](hf, source)


def hf_fields(config: ModelConfig) -> dict[str, Any]:
    """The family-specific keys of `config.json` (the caller adds architectures, vocabulary and token ids)."""
    return {"phi3": _phi3_hf, "falcon": _falcon_hf, "bloom": _bloom_hf}[config.family](config)


def _rope_hf(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    scaling = config.rope_scaling or {}
    parameters = {"rope_type": "default", **scaling, "rope_theta": config.rope_theta, **extra}
    return dict(rope_parameters=parameters, rope_theta=config.rope_theta, rope_scaling=config.rope_scaling)


def _cannot_spell(config: ModelConfig, **expected: Any) -> None:
    """Raise unless `config` has the `expected` field values (what the family's config.json can express)."""
    for field, want in expected.items():
        if getattr(config, field) != want:
            got = getattr(config, field)
            raise ValueError(f"family {config.family!r} cannot express {field}={got!r} in config.json")


# ---- Phi-3 / Phi-3.5 / Phi-4-mini --------------------------------------------------------------


def _phi3_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (silu)")
    theta, scaling = rope_from_hf(hf)
    # As Phi3Config reads it: the rope dict's own partial_rotary_factor, else the top-level key.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    scaling.pop("partial_rotary_factor", None)
    if scaling.get("rope_type") in ("su", "yarn"):  # Phi-3's first names for LongRoPE, as transformers reads them
        scaling["rope_type"] = "longrope"
    if scaling.get("rope_type") == "longrope":  # the top-level value takes priority (Phi3Config's default: 4096)
        scaling["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", 4096)
    return dict(
        vocab_size=hf.get("vocab_size", 32064),
        hidden_size=hf.get("hidden_size", 3072),
        intermediate_size=hf.get("intermediate_size", 8192),
        num_hidden_layers=hf.get("num_hidden_layers", 32),
        num_attention_heads=hf.get("num_attention_heads", 32),
        num_key_value_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling or None,
        partial_rotary_factor=partial,
        sliding_window=hf.get("sliding_window"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def _phi3_hf(config: ModelConfig) -> dict[str, Any]:
    _cannot_spell(config, norm="rmsnorm", mlp="swiglu", position="rope", attention_bias=False, qkv_bias=False,
                  mlp_bias=False, num_experts=0, layer_types=None, parallel_residual=False, embedding_norm=False)
    original = (config.rope_scaling or {}).get("original_max_position_embeddings", config.max_position_embeddings)
    return dict(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        original_max_position_embeddings=original,
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        partial_rotary_factor=config.partial_rotary_factor,
        **_rope_hf(config, partial_rotary_factor=config.partial_rotary_factor),
        sliding_window=config.sliding_window,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )


# ---- Falcon (7B style and the 40B "new decoder architecture") --------------------------------------


def _gelu_of(act: str, source: str, key: str) -> str:
    if act == "gelu":
        return "none"
    if act in GELU_TANH:
        return "tanh"
    raise ValueError(f"{source}: {key} {act!r} is not supported (gelu, {', '.join(GELU_TANH)})")


def _falcon_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    if hf.get("alibi"):
        raise ValueError(f"{source}: alibi=true is not supported for Falcon (only RoPE Falcon models load)")
    new = bool(hf.get("new_decoder_architecture", False))
    parallel = new or hf.get("parallel_attn", True)
    heads = hf.get("num_attention_heads", 71)
    kv = hf.get("num_kv_heads") or heads
    if not new and hf.get("multi_query", True):
        kv = 1
    norms = hf.get("num_ln_in_parallel_attn") or (2 if new else 1)
    if parallel and not new and norms != 1:
        raise ValueError(f"{source}: num_ln_in_parallel_attn={norms} needs new_decoder_architecture=true")
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError(f"{source}: apply_residual_connection_post_layernorm=true is not supported")
    hidden = hf.get("hidden_size") or hf.get("n_embed", 4544)
    theta, scaling = rope_from_hf(hf)
    bias = bool(hf.get("bias", False))
    return dict(
        vocab_size=hf.get("vocab_size", 65024),
        hidden_size=hidden,
        intermediate_size=hf.get("ffn_hidden_size") or 4 * hidden,
        num_hidden_layers=hf.get("num_hidden_layers", 32),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        gelu_approximate=_gelu_of(hf.get("activation", "gelu"), source, "activation"),
        rope_theta=theta,
        rope_scaling=scaling or None,
        attention_bias=bias,
        mlp_bias=bias,
        parallel_residual=bool(parallel),
        shared_block_norm=bool(parallel) and norms == 1,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def _falcon_hf(config: ModelConfig) -> dict[str, Any]:
    _cannot_spell(config, norm="layernorm", mlp="gelu", position="rope", qkv_bias=False, mlp_bias=config.attention_bias,
                  num_experts=0, sliding_window=None, embedding_norm=False, partial_rotary_factor=1.0,
                  head_dim=config.hidden_size // config.num_attention_heads)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    # The original layout (multi-query, or one K/V per head) is the new one with 1 or `heads` KV groups;
    # write it whenever it can express the block, as the published 7B checkpoints do.
    old = kv in (1, heads) and (config.shared_block_norm or not config.parallel_residual)
    return dict(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=kv,
        new_decoder_architecture=not old,
        multi_query=old and kv == 1,
        parallel_attn=config.parallel_residual,
        num_ln_in_parallel_attn=None if old else (1 if config.shared_block_norm else 2),
        ffn_hidden_size=config.intermediate_size,
        activation="gelu" if config.gelu_approximate == "none" else "gelu_pytorch_tanh",
        bias=config.attention_bias,
        alibi=False,
        layer_norm_epsilon=config.norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        **_rope_hf(config),
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


# ---- BLOOM ---------------------------------------------------------------------------------------


def _bloom_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError(f"{source}: apply_residual_connection_post_layernorm=true is not supported")
    if hf.get("pretraining_tp", 1) > 1 and hf.get("slow_but_exact"):
        raise ValueError(f"{source}: slow_but_exact=true with pretraining_tp > 1 is not supported")
    hidden = hf.get("hidden_size") or hf.get("n_embed", 64)
    return dict(
        vocab_size=hf.get("vocab_size", 250880),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=hf.get("n_layer") or hf.get("num_hidden_layers", 2),
        num_attention_heads=hf.get("n_head") or hf.get("num_attention_heads", 8),
        max_position_embeddings=hf.get("seq_length", 2048),  # ALiBi has no table; BLOOM trained at 2048
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        gelu_approximate="tanh",
        position="alibi",
        attention_bias=True,
        mlp_bias=True,
        embedding_norm=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def _bloom_hf(config: ModelConfig) -> dict[str, Any]:
    _cannot_spell(config, norm="layernorm", mlp="gelu", gelu_approximate="tanh", position="alibi",
                  attention_bias=True, mlp_bias=True, embedding_norm=True, parallel_residual=False,
                  intermediate_size=4 * config.hidden_size, num_key_value_heads=config.num_attention_heads,
                  head_dim=config.hidden_size // config.num_attention_heads, num_experts=0, sliding_window=None)
    return dict(
        hidden_size=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        layer_norm_epsilon=config.norm_eps,
        seq_length=config.max_position_embeddings,
        apply_residual_connection_post_layernorm=False,
        pretraining_tp=1,
        slow_but_exact=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


# ---- Gemma, Gemma 2/3, Qwen3 (Llama-style keys plus their own) ------------------------------------


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
