"""Gemma, Gemma 2 and Gemma 3 (text) `config.json`: Llama-style keys plus their own (offset norms, scaled
and tied embeddings; Gemma 2/3 alternate sliding-window and global layers and soft-cap, Gemma 3 has a
RoPE of its own for the local layers and QK-norm)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.families.llama import LlamaStyle
from lmforge.families.spelling import rope_parameters

if TYPE_CHECKING:
    from lmforge.config import ModelConfig


class GemmaStyle(LlamaStyle):
    """What every Gemma shares: offset RMSNorm weights, embeddings scaled by sqrt(hidden) and tied by default."""

    def read_extra(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{source}: use_bidirectional_attention=true is not supported")
        return dict(norm_offset=True, scale_embeddings=True, tie_word_embeddings=hf.get("tie_word_embeddings", True))

    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        return dict(attention_bias=config.attention_bias)


class Gemma(GemmaStyle):
    def gate_activation(self, hf: dict[str, Any], source: str) -> str:
        if hf.get(self.activation_key) == "gelu":  # old Gemma configs mean the tanh approximation, as transformers
            return "gelu_pytorch_tanh"
        return super().gate_activation(hf, source)


def local_global_fields(hf: dict[str, Any], pattern: int, final_softcap: float | None) -> dict[str, Any]:
    """Gemma 2/3's post-norms, query scale, final soft-cap and sliding-window layers (every `pattern`-th
    layer global, unless `layer_types` says otherwise)."""
    sliding = hf.get("sliding_window", 4096)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])
    ]
    return dict(post_norms=True, query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                sliding_window=sliding, layer_types=layer_types if sliding is not None else None,
                final_logit_softcapping=hf.get("final_logit_softcapping", final_softcap))


def local_global_hf(config: ModelConfig) -> dict[str, Any]:
    """Gemma 2/3's own keys."""
    return dict(hidden_activation=config.hidden_act,
                query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
                sliding_window=config.sliding_window,
                layer_types=config.layer_types or ["full_attention"] * config.num_hidden_layers,
                attn_logit_softcapping=config.attn_logit_softcapping,
                final_logit_softcapping=config.final_logit_softcapping)


class Gemma2(GemmaStyle):
    activation_key = "hidden_activation"

    def read_extra(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        return dict(super().read_extra(hf, source), **local_global_fields(hf, 2, 30.0),
                    attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0))

    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        return dict(super().write_extra(config), **local_global_hf(config))


class Gemma3(GemmaStyle):
    """Gemma 3's text model; its attention never soft-caps the scores (as transformers')."""

    activation_key = "hidden_activation"

    def read_extra(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        pattern = hf.get("sliding_window_pattern", 6)
        fields = dict(super().read_extra(hf, source), **local_global_fields(hf, pattern, None))
        nested = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
        if nested.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters.sliding_attention must be of rope_type default")
        fields["rope_local_base_freq"] = nested.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
        if "rope_theta" not in hf and "full_attention" not in (hf.get("rope_parameters") or {}):
            fields["rope_theta"] = 1_000_000.0
        fields["qk_norm"] = True
        return fields

    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        local = {"rope_type": "default", "rope_theta": config.rope_local_base_freq or config.rope_theta}
        return dict(super().write_extra(config), **local_global_hf(config),
                    rope_parameters={"full_attention": rope_parameters(config), "sliding_attention": local},
                    rope_local_base_freq=local["rope_theta"], rope_scaling=None)
