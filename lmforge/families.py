"""How Phi-3, Falcon and BLOOM spell `config.json`: read into `ModelConfig` fields and written back
(transformers-5 style, with the keys older readers look for). Only spelling lives here; what the
fields do is the decoder's business."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.config import ModelConfig

SPELLED_HERE = ("phi3", "falcon", "bloom")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
    (transformers 4, `type` or `rope_type`); the scaling is {} for plain RoPE."""
    rope = hf.get("rope_parameters") or {}
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
