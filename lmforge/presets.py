"""Named model configurations: the published sizes of each supported family, and CPU sizes for
tests, the demo and benchmarks."""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig


def _llama(**kw: Any) -> ModelConfig:
    return ModelConfig(family="llama", **kw)


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": _llama(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-13b": _llama(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama2-70b": _llama(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    ),
    "llama3-8b": _llama(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3.1-8b": _llama(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=128000,
        eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "mistral-7b": ModelConfig(
        family="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096,
    ),
    "mixtral-8x7b": ModelConfig(
        family="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6, num_experts=8, num_experts_per_tok=2,
    ),
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
        norm_eps=1e-6, qkv_bias=True, tie_word_embeddings=True, bos_token_id=None, eos_token_id=151643,
    ),
    "qwen2.5-7b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
        norm_eps=1e-6, qkv_bias=True, bos_token_id=None, eos_token_id=151643,
    ),
    "gpt2": ModelConfig(
        family="gpt2", vocab_size=50257, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=1024, norm="layernorm", mlp="gelu", position="learned",
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256,
    ),
    # CPU sizes for tests, the demo and benchmarks.
    "tiny": _llama(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=1024,
    ),
    "micro": _llama(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    # Rebuilt from the fields the preset sets, so overrides are validated and derived fields
    # (head_dim, num_key_value_heads) follow an overridden size unless the preset fixes them.
    base = PRESETS[name]
    return ModelConfig(**{**base.model_dump(include=base.model_fields_set), **overrides})
