"""BLOOM `config.json` (`n_layer`, `n_head`, ...): ALiBi, LayerNorm after the embeddings, tanh GELU,
biases everywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.families.spelling import Spelling, cannot_spell

if TYPE_CHECKING:
    from lmforge.config import ModelConfig


class Bloom(Spelling):
    def read(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
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

    def write(self, config: ModelConfig) -> dict[str, Any]:
        cannot_spell(config, norm="layernorm", mlp="gelu", gelu_approximate="tanh", position="alibi",
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
