"""Falcon `config.json`: the 7B style (multi-query attention, one norm feeding a parallel block) and the
40B "new decoder architecture" (KV groups, two norms); RoPE Falcons only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.families.spelling import Spelling, cannot_spell, rope_from_hf, rope_hf

if TYPE_CHECKING:
    from lmforge.config import ModelConfig


GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gelu_of(act: str, source: str, key: str) -> str:
    if act == "gelu":
        return "none"
    if act in GELU_TANH:
        return "tanh"
    raise ValueError(f"{source}: {key} {act!r} is not supported (gelu, {', '.join(GELU_TANH)})")


class Falcon(Spelling):
    def read(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
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

    def write(self, config: ModelConfig) -> dict[str, Any]:
        cannot_spell(config, norm="layernorm", mlp="gelu", position="rope", qkv_bias=False,
                     mlp_bias=config.attention_bias, num_experts=0, sliding_window=None, embedding_norm=False,
                     partial_rotary_factor=1.0, head_dim=config.hidden_size // config.num_attention_heads)
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
            **rope_hf(config),
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
