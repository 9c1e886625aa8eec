"""The Llama-style `config.json`: Llama's keys, which Mistral, Mixtral, Qwen2, Qwen3 and Qwen3-MoE (and
Gemma, in `lmforge.families.gemma`) spell the same way, each family adding its own keys."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.families.spelling import Spelling, rope_from_hf, rope_hf

if TYPE_CHECKING:
    from lmforge.config import ModelConfig


class LlamaStyle(Spelling):
    """Llama's keys; a family adds its own by overriding `read_extra` and `write_extra`."""

    activation_key = "hidden_act"  # the key naming the gated MLP's activation

    def read(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        rope_theta, scaling = rope_from_hf(hf)
        sliding = hf.get("sliding_window")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling or None,
            attention_bias=hf.get("attention_bias", False),
            qkv_bias=False,
            mlp_bias=hf.get("mlp_bias", False),
            sliding_window=sliding,
            layer_types=hf.get("layer_types") if sliding is not None else None,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            hidden_act=self.gate_activation(hf, source),
        )
        fields.update(self.read_extra(hf, source))
        if hf.get("pretraining_tp", 1) != 1:
            raise ValueError(f"{source}: pretraining_tp != 1 is not supported")
        return fields

    def read_extra(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        """The fields the family's own keys set (they override Llama's reading)."""
        return {}

    def gate_activation(self, hf: dict[str, Any], source: str) -> str:
        """The gated MLP's activation: silu or tanh GELU."""
        act = hf.get(self.activation_key) or "silu"
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: {self.activation_key} {act!r} is not supported (silu, gelu_pytorch_tanh)")
        return act

    def write(self, config: ModelConfig) -> dict[str, Any]:
        hf = dict(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.norm_eps,
            hidden_act=config.hidden_act,
            **rope_hf(config),
            attention_dropout=0.0,
        )
        hf.update(self.write_extra(config))
        return hf

    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        """The family's own keys (they override Llama's)."""
        return {}


class Llama(LlamaStyle):
    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        return dict(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)


class Mistral(LlamaStyle):
    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        return dict(sliding_window=config.sliding_window)


class Mixtral(Mistral):
    def read_extra(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        return dict(num_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2))

    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        return dict(super().write_extra(config), num_local_experts=config.num_experts,
                    num_experts_per_tok=config.num_experts_per_tok, router_jitter_noise=0.0, output_router_logits=False)


def qwen_window_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen's sliding window: only with `use_sliding_window`, on the layers from `max_window_layers` on
    unless `layer_types` says otherwise."""
    if not hf.get("use_sliding_window", False):
        return dict(sliding_window=None, layer_types=None)
    sliding, layer_types = hf.get("sliding_window"), hf.get("layer_types")
    if sliding is not None and layer_types is None:
        first_full = hf.get("max_window_layers", 0)
        layer_types = [
            "sliding_attention" if i >= first_full else "full_attention" for i in range(hf["num_hidden_layers"])
        ]
    return dict(sliding_window=sliding, layer_types=layer_types if sliding is not None else None)


def qwen_window_hf(config: ModelConfig) -> dict[str, Any]:
    """Qwen's sliding-window keys, with one layer type per layer."""
    layer_types = config.layer_types or ["full_attention"] * config.num_hidden_layers
    return dict(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
                layer_types=layer_types, max_window_layers=config.num_hidden_layers)


class Qwen2(LlamaStyle):
    def read_extra(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        return dict(qwen_window_fields(hf), qkv_bias=True)

    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        return qwen_window_hf(config)


class Qwen3(LlamaStyle):
    def read_extra(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        return dict(qwen_window_fields(hf), qk_norm=True)

    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        return dict(attention_bias=config.attention_bias, **qwen_window_hf(config))


class Qwen3Moe(Qwen3):
    def read_extra(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        # transformers 5 writes num_local_experts (an alias), the published configs num_experts
        return dict(super().read_extra(hf, source),
                    num_experts=hf.get("num_local_experts", hf.get("num_experts", 128)),
                    num_experts_per_tok=hf.get("num_experts_per_tok", 8),
                    moe_intermediate_size=hf.get("moe_intermediate_size", 768),
                    norm_topk_prob=hf.get("norm_topk_prob", False),
                    decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                    mlp_only_layers=hf.get("mlp_only_layers") or [])

    def write_extra(self, config: ModelConfig) -> dict[str, Any]:
        return dict(super().write_extra(config), num_experts=config.num_experts,
                    num_experts_per_tok=config.num_experts_per_tok,
                    moe_intermediate_size=config.moe_intermediate_size or config.intermediate_size,
                    norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=config.decoder_sparse_step,
                    mlp_only_layers=config.mlp_only_layers, output_router_logits=False)
