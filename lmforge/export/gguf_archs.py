"""llama.cpp's architectures as `lmforge.export.gguf` writes them: one declarative entry each.

An `Arch` says how llama.cpp's `convert_hf_to_gguf.py` spells a model for that architecture: which of
our tensors get other names (`renames`, over the common `TENSOR_NAMES`), which are fused (Phi-3's and
Falcon's `attn_qkv`, Phi-3's gate-and-up `ffn_up`), whether q/k rows are reordered for rotary pairs
(`interleaved_rope`: only `llama` rotates adjacent pairs; the rest rotate halves, as Hugging Face does),
its extra metadata keys (`keys`), and what its llama.cpp graph cannot express (`unsupported`: a
one-line reason, so export refuses rather than write a file llama.cpp would misread). Behaviour
that config fields switch (offset norms, LayerNorm, partial rotary, LongRoPE factors) is written by
the exporter for every architecture that accepts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf

from lmforge.config import ModelConfig
from lmforge.positions import rope_attention_scaling

# Our parameter names (= transformers' Llama names) -> llama.cpp's; `.weight`/`.bias` follow both.
# `{i}` is the layer; `{e}`, an expert: each layer's experts are stacked into one 3-D tensor.
# `qkv_proj` and `gate_up_proj` exist only once the exporter has fused them for an architecture.
TENSOR_NAMES = (
    ("model.embed_tokens", "token_embd"),
    ("model.embed_layernorm", "token_embd_norm"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("model.layers.{i}.input_layernorm", "blk.{i}.attn_norm"),
    ("model.layers.{i}.self_attn.qkv_proj", "blk.{i}.attn_qkv"),
    ("model.layers.{i}.self_attn.q_proj", "blk.{i}.attn_q"),
    ("model.layers.{i}.self_attn.q_norm", "blk.{i}.attn_q_norm"),
    ("model.layers.{i}.self_attn.k_proj", "blk.{i}.attn_k"),
    ("model.layers.{i}.self_attn.k_norm", "blk.{i}.attn_k_norm"),
    ("model.layers.{i}.self_attn.v_proj", "blk.{i}.attn_v"),
    ("model.layers.{i}.self_attn.o_proj", "blk.{i}.attn_output"),
    ("model.layers.{i}.post_attention_layernorm", "blk.{i}.ffn_norm"),
    ("model.layers.{i}.pre_feedforward_layernorm", "blk.{i}.ffn_norm"),
    ("model.layers.{i}.post_feedforward_layernorm", "blk.{i}.post_ffw_norm"),
    ("model.layers.{i}.mlp.gate_up_proj", "blk.{i}.ffn_up"),
    ("model.layers.{i}.mlp.gate_proj", "blk.{i}.ffn_gate"),
    ("model.layers.{i}.mlp.up_proj", "blk.{i}.ffn_up"),
    ("model.layers.{i}.mlp.down_proj", "blk.{i}.ffn_down"),
    ("model.layers.{i}.mlp.gate", "blk.{i}.ffn_gate_inp"),
    ("model.layers.{i}.mlp.experts.{e}.gate_proj", "blk.{i}.ffn_gate_exps"),
    ("model.layers.{i}.mlp.experts.{e}.up_proj", "blk.{i}.ffn_up_exps"),
    ("model.layers.{i}.mlp.experts.{e}.down_proj", "blk.{i}.ffn_down_exps"),
)
SANDWICH_NORMS = {"model.layers.{i}.post_attention_layernorm": "blk.{i}.post_attention_norm"}  # Gemma 2/3
FALCON_TWO_NORMS = {  # Falcon-40B: attn_norm_2 feeds attention, attn_norm the MLP
    "model.layers.{i}.input_layernorm": "blk.{i}.attn_norm_2",
    "model.layers.{i}.post_attention_layernorm": "blk.{i}.attn_norm",
}

Check = Callable[[ModelConfig], "str | None"]
Keys = Callable[[gguf.GGUFWriter, ModelConfig], None]


def _none(config: ModelConfig) -> str | None:
    return None


def _no_keys(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    pass


@dataclass(frozen=True)
class Arch:
    """How one llama.cpp architecture is written (see the module docstring)."""

    name: str
    interleaved_rope: bool = False
    renames: Callable[[ModelConfig], dict[str, str]] = lambda config: {}
    fuse_qkv: bool = False  # q, k, v rows concatenated into one `attn_qkv` (biases likewise)
    fuse_gate_up: bool = False  # gate rows, then up rows, as one `ffn_up` (llama.cpp's fused SwiGLU)
    tied_output: bool = False  # llama.cpp always reads token_embd as the output head
    sliding_window: bool = False  # llama.cpp applies the config's sliding window (else attends over everything)
    rope_types: frozenset[str] = frozenset({"default", "linear"})
    keys: Keys = _no_keys
    unsupported: Check = _none


def _first(*checks: tuple[bool, str]) -> str | None:
    """The reason of the first failing check (`(ok, reason)` pairs), or None."""
    return next((reason for ok, reason in checks if not ok), None)


def _layer_types(config: ModelConfig) -> list[bool]:
    return [config.is_sliding(i) for i in range(config.num_hidden_layers)]


# ---- Gemma family ----------------------------------------------------------------------------------


def _gemma_query_scale(config: ModelConfig, big_layers: int) -> str | None:
    """llama.cpp scales queries by head_dim^-1/2, or (hidden / heads)^-1/2 for the 27B layer count."""
    expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == big_layers \
        else config.head_dim
    if (config.query_pre_attn_scalar or config.head_dim) != expected:
        return (f"query_pre_attn_scalar={config.query_pre_attn_scalar} (llama.cpp's {{arch}} architecture "
                f"scales queries by {expected}^-1/2 for {config.num_hidden_layers} layers)")
    return None


def _gemma_common(config: ModelConfig) -> str | None:
    return _first(
        (config.hidden_act == "gelu_pytorch_tanh", f"hidden_act={config.hidden_act} (llama.cpp's {{arch}} "
                                                   "uses tanh GELU)"),
        (not (config.attention_bias or config.qkv_bias or config.mlp_bias), "biases"),
    )


def _gemma_unsupported(config: ModelConfig) -> str | None:
    return _gemma_common(config) or _first((config.sliding_window is None, "a sliding window"))


def _gemma2_unsupported(config: ModelConfig) -> str | None:
    pattern = [i % 2 == 0 for i in range(config.num_hidden_layers)]  # llama.cpp: every other layer, from 0
    return _gemma_common(config) or _gemma_query_scale(config, 46) or _first(
        (config.attn_logit_softcapping is not None and config.final_logit_softcapping is not None,
         "Gemma 2 without both soft-caps"),
        (config.sliding_window is None or _layer_types(config) == pattern,
         "sliding-window layers other than every other one from layer 0"),
    )


def _gemma2_keys(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window or 0)


def _gemma3_unsupported(config: ModelConfig) -> str | None:
    return _gemma_common(config) or _gemma_query_scale(config, 62) or _first(
        (config.attn_logit_softcapping is None, "attention soft-capping"),
    )


def _gemma3_keys(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern(_layer_types(config))
    if config.rope_local_base_freq is not None:
        writer.add_rope_freq_base_swa(config.rope_local_base_freq)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


# ---- Qwen3, Phi-3, Falcon, BLOOM -------------------------------------------------------------------


def _qwen3_unsupported(config: ModelConfig) -> str | None:
    return _first((not (config.attention_bias or config.qkv_bias or config.mlp_bias), "biases"))


def _qwen3moe_unsupported(config: ModelConfig) -> str | None:
    all_sparse = all(config.is_sparse(i) for i in range(config.num_hidden_layers))
    return _qwen3_unsupported(config) or _first(
        (all_sparse, "dense MLP layers among the experts (mlp_only_layers, decoder_sparse_step)"),
        (config.norm_topk_prob, "norm_topk_prob=false (llama.cpp's {arch} renormalises the chosen experts)"),
    )


def _qwen3moe_keys(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    writer.add_expert_feed_forward_length(config.moe_intermediate_size or config.intermediate_size)


def _phi3_unsupported(config: ModelConfig) -> str | None:
    return _first((not (config.attention_bias or config.qkv_bias or config.mlp_bias), "biases"))


def _phi3_keys(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    scaling = config.rope_scaling or {}
    writer.add_sliding_window(config.sliding_window or 0)  # 0: none (convert_hf_to_gguf's Phi-4 marker)
    original = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(original)
    if scaling.get("rope_type") == "longrope":
        writer.add_rope_scaling_attn_factors(rope_attention_scaling(config))


def _falcon_unsupported(config: ModelConfig) -> str | None:
    return _first(
        (config.parallel_residual, "sequential blocks (llama.cpp's {arch} runs attention and MLP in parallel)"),
        (not (config.attention_bias or config.mlp_bias), "biases"),
    )


def _layer_norm_model(config: ModelConfig) -> str | None:
    return None if config.norm == "layernorm" else f"{config.norm} (llama.cpp's {{arch}} uses LayerNorm)"


ARCHS = {
    "llama": Arch("llama", interleaved_rope=True, rope_types=frozenset({"default", "linear", "llama3"})),
    "qwen2": Arch("qwen2"),
    "gemma": Arch("gemma", tied_output=True, unsupported=_gemma_unsupported),
    "gemma2": Arch("gemma2", renames=lambda config: SANDWICH_NORMS, tied_output=True, sliding_window=True,
                   keys=_gemma2_keys, unsupported=_gemma2_unsupported),
    "gemma3": Arch("gemma3", renames=lambda config: SANDWICH_NORMS, sliding_window=True, keys=_gemma3_keys,
                   unsupported=_gemma3_unsupported),
    "qwen3": Arch("qwen3", unsupported=_qwen3_unsupported),
    "qwen3moe": Arch("qwen3moe", keys=_qwen3moe_keys, unsupported=_qwen3moe_unsupported),
    "phi3": Arch("phi3", fuse_qkv=True, fuse_gate_up=True, rope_types=frozenset({"default", "longrope"}),
                 keys=_phi3_keys, unsupported=_phi3_unsupported),
    "falcon": Arch("falcon", fuse_qkv=True, renames=lambda c: {} if c.shared_block_norm else FALCON_TWO_NORMS,
                   unsupported=lambda c: _layer_norm_model(c) or _falcon_unsupported(c)),
    "bloom": Arch("bloom", fuse_qkv=True, unsupported=_layer_norm_model),
}
FAMILY_ARCHS = {  # lmforge family (config.json's spelling) -> llama.cpp architecture
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "phi3": "phi3",
    "falcon": "falcon", "bloom": "bloom",
}


def arch_of(config: ModelConfig) -> Arch:
    """The llama.cpp architecture `config` exports as; ValueError when there is none, or when that
    architecture cannot express the model (the reason names the config field)."""
    if config.family not in FAMILY_ARCHS:
        raise ValueError(f"{config.family} checkpoints are not supported for GGUF export yet "
                         f"(supported: {', '.join(FAMILY_ARCHS)})")
    arch = ARCHS[FAMILY_ARCHS[config.family]]
    rope_type = (config.rope_scaling or {}).get("rope_type", "default")
    reason = arch.unsupported(config) or _first(
        (config.tie_word_embeddings or not arch.tied_output, "an untied lm_head (it reuses token_embd)"),
        (config.position != "rope" or rope_type in arch.rope_types, f"{rope_type} rope scaling"),
        (not (config.num_experts and config.mlp_bias), "mixture-of-experts MLP biases"),
    )
    if reason is not None:
        raise ValueError(f"GGUF export of this {config.family} model is not supported: llama.cpp's "
                         f"{arch.name} architecture cannot express {reason.format(arch=arch.name)}")
    return arch


def llama3_rope_factors(config: ModelConfig) -> list[float]:
    """Llama 3's rope scaling as llama.cpp takes it: per frequency, the factor it is divided by."""
    s = config.rope_scaling or {}
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    factors = []
    for i in range(0, config.head_dim, 2):
        wavelen = 2 * math.pi * config.rope_theta ** (i / config.head_dim)
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors
