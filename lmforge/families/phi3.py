"""Phi-3, Phi-3.5 and Phi-4-mini `config.json`: Llama-like keys with partial rotary embeddings and
LongRoPE (also under its first names, `su` and `yarn`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.families.spelling import Spelling, cannot_spell, rope_from_hf, rope_hf

if TYPE_CHECKING:
    from lmforge.config import ModelConfig


class Phi3(Spelling):
    def read(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
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

    def write(self, config: ModelConfig) -> dict[str, Any]:
        cannot_spell(config, norm="rmsnorm", mlp="swiglu", position="rope", attention_bias=False, qkv_bias=False,
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
            **rope_hf(config, partial_rotary_factor=config.partial_rotary_factor),
            sliding_window=config.sliding_window,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
