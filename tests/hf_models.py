"""Tiny random transformers models of every supported family, built inside the tests."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 97


def tiny_hf_model(family: str, **overrides: Any):
    """A random-weight transformers causal LM of `family` at a tiny size, in fp32 eval mode."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if family == "llama":
        config = tf.LlamaConfig(**common)
    elif family == "llama3":
        config = tf.LlamaConfig(
            **common,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        )
    elif family == "mistral":
        config = tf.MistralConfig(**common, sliding_window=8)
    elif family == "mixtral":
        config = tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen2":
        config = tf.Qwen2Config(**common, tie_word_embeddings=True)
    elif family == "gemma":  # head_dim independent of hidden / heads; untied (tied, greedy repeats the last token)
        config = tf.GemmaConfig(**common, head_dim=16, tie_word_embeddings=False)
    elif family == "gemma2":  # sliding, global, sliding, global; both soft-caps; query scale != head_dim
        config = tf.Gemma2Config(
            **{**common, "num_hidden_layers": 4}, head_dim=16, sliding_window=8, query_pre_attn_scalar=12,
            attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
        )
    elif family == "gemma3":  # local layers at their own RoPE base, global ones linearly scaled
        config = tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3}, head_dim=16, sliding_window=8, query_pre_attn_scalar=12,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        )
    elif family == "qwen3":
        config = tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    elif family == "qwen3_moe":  # a dense layer, then a sparse one; router probabilities not renormalised
        config = tf.Qwen3MoeConfig(
            **common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            mlp_only_layers=[0], norm_topk_prob=False,
        )
    elif family == "phi3":  # Phi-3-mini-4k's layout: fused qkv_proj and gate_up_proj, a sliding window
        config = tf.Phi3Config(**common, sliding_window=16)
    elif family == "phi3-longrope":  # Phi-4-mini's: partial rotary (6 of 8 dims), LongRoPE past 32 positions
        config = tf.Phi3Config(
            **common, original_max_position_embeddings=32,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                             "short_factor": [1.0, 1.5, 2.5], "long_factor": [1.5, 4.0, 12.0]},
        )
    elif family in ("falcon", "falcon-new"):  # 7B: multi-query, one norm; 40B: 2 KV groups, two norms, biases
        new = family == "falcon-new"
        config = tf.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_kv_heads=2 if new else None, new_decoder_architecture=new, multi_query=not new, bias=new,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    elif family == "bloom":
        config = tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                                eos_token_id=2, pad_token_id=0)
    elif family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # biases and norms start at 0/1; make them random so they are checked too
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model
