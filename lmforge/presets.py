"""Named model configurations: the published sizes of each supported family, and CPU sizes for
tests, the demo and benchmarks; the encoder-decoder ones (T5, FLAN-T5) in `SEQ2SEQ_PRESETS`."""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.seq2seq import Seq2SeqConfig


def _llama(**kw: Any) -> ModelConfig:
    return ModelConfig(family="llama", **kw)


# Phi-4-mini-instruct's config.json: rope_scaling.long_factor (its short_factor is 48 x 1.0).
PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23,
    32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]
FALCON: dict[str, Any] = dict(  # what Falcon-7B and -40B share
    norm="layernorm", mlp="gelu", gelu_approximate="none", parallel_residual=True, tie_word_embeddings=True,
    bos_token_id=11, eos_token_id=11,
)
BLOOM: dict[str, Any] = dict(  # what every BLOOM size shares
    max_position_embeddings=2048, norm="layernorm", mlp="gelu", position="alibi", attention_bias=True, mlp_bias=True,
    embedding_norm=True, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
)
def _gemma(family: str, **kw: Any) -> ModelConfig:
    """Gemma's common fields: GeGLU, offset norms, scaled and tied embeddings, 256-wide heads
    (Gemma 2/3 add post-norms, a query scale, sliding-window layers; Gemma 3 QK-norm)."""
    common = dict(
        vocab_size=256000, head_dim=256, hidden_act="gelu_pytorch_tanh", norm_offset=True, scale_embeddings=True,
        tie_word_embeddings=True, norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    later = {} if family == "gemma" else dict(post_norms=True, query_pre_attn_scalar=256)
    return ModelConfig(family=family, **{**common, **later, **kw})


def _qwen3(**kw: Any) -> ModelConfig:
    return ModelConfig(
        family="qwen3", vocab_size=151936, head_dim=128, qk_norm=True, max_position_embeddings=40960, rope_theta=1e6,
        norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, **kw,
    )


LLAMA3_2 = dict(
    vocab_size=128256, intermediate_size=8192, num_key_value_heads=8, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)

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
    "yi-6b": _llama(
        vocab_size=64000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=4, rope_theta=5e6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "llama3.2-1b": _llama(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64, **LLAMA3_2),
    "llama3.2-3b": _llama(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128, **LLAMA3_2),
    "gemma-2b": _gemma(
        "gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, max_position_embeddings=8192,
    ),
    "gemma2-2b": _gemma(
        "gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=8192, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4096, layer_types=["sliding_attention", "full_attention"] * 13,
    ),
    "gemma3-1b": _gemma(
        "gemma3", vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32768, qk_norm=True, rope_theta=1e6,
        rope_local_base_freq=10000.0, sliding_window=512, eos_token_id=[1, 106],
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 4 + ["sliding_attention"] * 2,
    ),
    "qwen3-0.6b": _qwen3(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": _qwen3(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    ),
    "qwen3-30b-a3b": ModelConfig(
        family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, qk_norm=True, max_position_embeddings=40960,
        rope_theta=1e6, norm_eps=1e-6, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True, bos_token_id=151643, eos_token_id=151645,
    ),
    "phi3-mini": ModelConfig(  # Phi-3-mini-4k-instruct
        family="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, sliding_window=2047,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    ),
    "phi4-mini": ModelConfig(  # Phi-4-mini-instruct: partial rotary (96 of 128 dims), LongRoPE from 4k to 128k
        family="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072, sliding_window=262144,
        partial_rotary_factor=0.75, tie_word_embeddings=True, bos_token_id=199999, eos_token_id=199999,
        pad_token_id=199999,
        rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 4096, "short_factor": [1.0] * 48,
                      "long_factor": PHI4_MINI_LONG_FACTOR},
    ),
    "falcon-7b": ModelConfig(  # multi-query attention, attention and MLP in parallel off one LayerNorm
        family="falcon", vocab_size=65024, hidden_size=4544, intermediate_size=18176, num_hidden_layers=32,
        num_attention_heads=71, num_key_value_heads=1, max_position_embeddings=2048, **FALCON,
        shared_block_norm=True,
    ),
    "falcon-40b": ModelConfig(  # the "new decoder architecture": 8 KV groups, two parallel LayerNorms
        family="falcon", vocab_size=65024, hidden_size=8192, intermediate_size=32768, num_hidden_layers=60,
        num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=2048, **FALCON,
    ),
    "bloom-560m": ModelConfig(
        family="bloom", vocab_size=250880, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, **BLOOM,
    ),
    "bloom-7b1": ModelConfig(
        family="bloom", vocab_size=250880, hidden_size=4096, intermediate_size=16384, num_hidden_layers=30,
        num_attention_heads=32, **BLOOM,
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


def _flan_t5(**kw: Any) -> Seq2SeqConfig:
    """FLAN-T5 (T5 v1.1's layout): gated-GELU MLP, untied and unscaled head, 64-wide heads."""
    return Seq2SeqConfig(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **kw)


# The published configs' sizes (parameter counts in tests/test_seq2seq.py, checked against transformers).
SEQ2SEQ_PRESETS: dict[str, Seq2SeqConfig] = {
    "t5-small": Seq2SeqConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
    "flan-t5-base": _flan_t5(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "flan-t5-large": _flan_t5(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16),
    "flan-t5-xl": _flan_t5(hidden_size=2048, intermediate_size=5120, num_hidden_layers=24, num_attention_heads=32),
}


def seq2seq_preset(name: str, **overrides: Any) -> Seq2SeqConfig:
    """A named encoder-decoder preset, optionally with fields overridden (derived ones follow)."""
    if name not in SEQ2SEQ_PRESETS:
        raise ValueError(f"unknown encoder-decoder preset {name!r}; choose one of {', '.join(SEQ2SEQ_PRESETS)}")
    base = SEQ2SEQ_PRESETS[name]
    return Seq2SeqConfig(**{**base.model_dump(include=base.model_fields_set), **overrides})
