"""GPT-2's `config.json` (`n_embd`, `n_layer`, ...): learned positions, LayerNorm, a tanh-GELU MLP, biases
everywhere and tied embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.families.spelling import Spelling

if TYPE_CHECKING:
    from lmforge.config import ModelConfig


class Gpt2(Spelling):
    def read(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        fields = dict(
            vocab_size=hf.get("vocab_size", 50257),
            hidden_size=hf.get("n_embd", 768),
            num_hidden_layers=hf.get("n_layer", 12),
            num_attention_heads=hf.get("n_head", 12),
            intermediate_size=hf.get("n_inner") or 4 * hf.get("n_embd", 768),
            max_position_embeddings=hf.get("n_positions", 1024),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp="gelu",
            position="learned",
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: activation_function {act!r} is not supported (gelu_new)")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise ValueError(f"{source}: {key}=true is not supported")
        return fields

    def write(self, config: ModelConfig) -> dict[str, Any]:
        return dict(
            n_embd=config.hidden_size,
            n_layer=config.num_hidden_layers,
            n_head=config.num_attention_heads,
            n_inner=config.intermediate_size,
            n_positions=config.max_position_embeddings,
            n_ctx=config.max_position_embeddings,
            layer_norm_epsilon=config.norm_eps,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
