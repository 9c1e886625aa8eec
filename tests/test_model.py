"""lmforge.model against transformers: logits parity per family (load and save), transformers-4
configs, KV-cache decoding, left padding, and parameter/FLOP/KV-cache counts of the real presets."""

import json

import pytest
import torch
import transformers as tf
from hf_models import VOCAB

from lmforge.checkpoint import load_model, save_model
from lmforge.config import ModelConfig
from lmforge.kv_cache import KVCache
from lmforge.model import Transformer
from lmforge.positions import alibi_slopes
from lmforge.presets import PRESETS

FAMILIES = ["llama", "llama3", "mistral", "mixtral", "qwen2", "gpt2", "gemma", "gemma2", "gemma3", "qwen3", "qwen3_moe",
            "phi3", "phi3-longrope", "falcon", "falcon-new", "bloom"]
VARIANTS = ["llama-bias", "llama3-smooth", "qwen2-sliding"]  # see conftest.VARIANTS
ARCHITECTURE = {  # name -> (architectures[0], model_type) in config.json
    "llama": ("LlamaForCausalLM", "llama"),
    "llama3": ("LlamaForCausalLM", "llama"),
    "llama-bias": ("LlamaForCausalLM", "llama"),
    "llama3-smooth": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen2-sliding": ("Qwen2ForCausalLM", "qwen2"),
    "gpt2": ("GPT2LMHeadModel", "gpt2"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "phi3-longrope": ("Phi3ForCausalLM", "phi3"),
    "falcon": ("FalconForCausalLM", "falcon"),
    "falcon-new": ("FalconForCausalLM", "falcon"),
    "bloom": ("BloomForCausalLM", "bloom"),
}
SEQ = 40  # longer than Mistral's and Gemma 2/3's sliding windows (8), Llama-3's and LongRoPE Phi-3's contexts (32)


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ---- parity with transformers --------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES + VARIANTS)
def test_load_transformers_checkpoint_matches_logits(hf_checkpoint, name):
    hf, path = hf_checkpoint(name)
    ids = _ids()
    model = load_model(path)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        ours = model(ids)
    assert _max_diff(ours, _hf_logits(hf, ids)) < 1e-4
    with torch.no_grad():  # the last-position shortcut agrees with the full pass
        assert _max_diff(model(ids, last_only=True), ours[:, -1:]) < 1e-5


@pytest.mark.parametrize("name", FAMILIES + VARIANTS)
def test_saved_model_loads_in_transformers(hf_checkpoint, tmp_path, name):
    hf, path = hf_checkpoint(name)
    ids = _ids()
    out = save_model(load_model(path), tmp_path / "ours")
    config = json.loads((out / "config.json").read_text())
    arch, model_type = ARCHITECTURE[name]
    assert config["architectures"] == [arch]
    assert config["model_type"] == model_type
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == arch
    assert _max_diff(_hf_logits(reloaded, ids), _hf_logits(hf, ids)) < 1e-4
    generation = tf.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
NATIVE = {  # configs made in lmforge, never read from transformers
    "llama": ModelConfig(family="llama", **SMALL, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 24}),
    "llama-linear": ModelConfig(family="llama", **SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": ModelConfig(family="mistral", **SMALL, sliding_window=8),
    "mixtral": ModelConfig(family="mixtral", **SMALL, num_experts=4, num_experts_per_tok=2),
    "qwen2": ModelConfig(family="qwen2", **SMALL, qkv_bias=True, tie_word_embeddings=True, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"]),
    "gpt2": ModelConfig(family="gpt2", **{**SMALL, "num_key_value_heads": 4, "intermediate_size": 96}, norm="layernorm",
                        mlp="gelu", position="learned", attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "gemma2": ModelConfig(family="gemma2", **SMALL, head_dim=16, hidden_act="gelu_pytorch_tanh", norm_offset=True,
                          scale_embeddings=True, post_norms=True, query_pre_attn_scalar=12, attn_logit_softcapping=20.0,
                          final_logit_softcapping=10.0, sliding_window=8, tie_word_embeddings=True,
                          layer_types=["sliding_attention", "full_attention"]),
    "gemma3": ModelConfig(family="gemma3", **SMALL, head_dim=16, hidden_act="gelu_pytorch_tanh", norm_offset=True,
                          scale_embeddings=True, post_norms=True, qk_norm=True, query_pre_attn_scalar=12,
                          sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                          tie_word_embeddings=True, rope_local_base_freq=100.0,
                          rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen3_moe": ModelConfig(family="qwen3_moe", **SMALL, head_dim=16, qk_norm=True, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False,
                             decoder_sparse_step=2),  # layer 0 dense, layer 1 sparse
    "phi3": ModelConfig(family="phi3", **SMALL, partial_rotary_factor=0.5, rope_scaling={
        "rope_type": "longrope", "original_max_position_embeddings": 24, "short_factor": [1.0, 2.0],
        "long_factor": [3.0, 9.0], "attention_factor": 1.3}),
    # multi-query, sequential blocks: written as Falcon's original layout; then 4 KV groups, two parallel norms
    "falcon": ModelConfig(family="falcon", **{**SMALL, "num_key_value_heads": 1}, norm="layernorm", mlp="gelu",
                          gelu_approximate="none", attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "falcon-parallel": ModelConfig(family="falcon", **{**SMALL, "num_key_value_heads": 4}, norm="layernorm", mlp="gelu",
                                   gelu_approximate="none", parallel_residual=True),
    "bloom": ModelConfig(family="bloom", **{**SMALL, "num_key_value_heads": 4, "intermediate_size": 128},
                         norm="layernorm", mlp="gelu", position="alibi", attention_bias=True, mlp_bias=True,
                         embedding_norm=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_model_built_in_lmforge_loads_in_transformers(tmp_path, name):
    cfg = NATIVE[name]
    model = Transformer(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():  # init leaves biases 0 and norms 1; randomise them so they are checked too
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    model.eval()
    out = save_model(model, tmp_path / "native")
    theirs = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == cfg.to_hf()["architectures"][0]
    assert sum(p.numel() for p in theirs.parameters()) == cfg.num_parameters() == model.num_parameters()
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    assert _max_diff(_hf_logits(theirs, ids), ours) < 1e-4
    assert load_model(out).config == cfg


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_transformers4_config_with_rope_scaling(hf_checkpoint, key):
    """A Llama-3 config.json as transformers 4 wrote it: `rope_theta` and `rope_scaling`
    at the top level (with `type` or `rope_type`), no `rope_parameters`."""
    hf, path = hf_checkpoint("llama3")
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    assert rope["rope_type"] == "llama3"
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {key: rope.pop("rope_type"), **rope}
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.45.0"
    (path / "config.json").write_text(json.dumps(config))
    ids = _ids()
    model = load_model(path)
    assert model.config.rope_theta == 500000.0
    assert model.config.rope_scaling["rope_type"] == "llama3"
    with torch.no_grad():
        ours = model(ids)
    reference = _hf_logits(hf, ids)
    assert _max_diff(ours, reference) < 1e-4

    # The scaling matters at this length: dropping it changes the logits well beyond tolerance.
    del config["rope_scaling"]
    (path / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        unscaled = load_model(path)(ids)
    assert _max_diff(unscaled, reference) > 0.1


def test_transformers4_gemma3_config(hf_checkpoint):
    """A Gemma 3 config.json as transformers 4 wrote it: top-level `rope_theta`, `rope_scaling`,
    `rope_local_base_freq` and a `sliding_window_pattern` instead of `layer_types`."""
    hf, path = hf_checkpoint("gemma3")
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    assert config.pop("layer_types") == ["sliding_attention", "sliding_attention", "full_attention"]
    config.update(rope_theta=rope["full_attention"]["rope_theta"], rope_scaling={"rope_type": "linear", "factor": 2.0},
                  rope_local_base_freq=rope["sliding_attention"]["rope_theta"], sliding_window_pattern=3)
    (path / "config.json").write_text(json.dumps(config))
    model = load_model(path)
    assert model.config.rope_local_base_freq == 100.0 and model.config.rope_theta == 10000.0
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(model(ids), _hf_logits(hf, ids)) < 1e-4


# ---- KV cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "mistral", "mixtral", "gpt2", "qwen2-sliding", "gemma2", "gemma3", "qwen3",
                                  "phi3", "falcon", "falcon-new", "bloom"])
def test_kv_cache_decoding_equals_full_forward(hf_checkpoint, name):
    _, path = hf_checkpoint(name)
    model = load_model(path)
    ids = _ids()
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, SEQ, dtype=torch.float32, device="cpu")
        steps = [(0, 12), (12, 17)] + [(t, t + 1) for t in range(17, SEQ)]  # prefill, a chunk, then one by one
        pieces = []
        for start, end in steps:
            assert cache.length == start
            pieces.append(model(ids[:, start:end], cache=cache))
        assert cache.length == SEQ
        assert _max_diff(torch.cat(pieces, dim=1), full) < 1e-5
        with pytest.raises(ValueError, match="full"):
            model(ids[:, :1], cache=cache)


@torch.no_grad()
def test_longrope_cached_decoding_matches_transformers(hf_checkpoint):
    """LongRoPE switches factor sets per forward pass (on its largest position), so cached decoding is not
    the full forward: both must match transformers' own cached decoding, step for step."""
    hf, path = hf_checkpoint("phi3-longrope")
    model = load_model(path)
    ids = _ids()
    cache = KVCache(model.config, 2, SEQ, dtype=torch.float32, device="cpu")
    theirs = tf.DynamicCache(config=hf.config)
    for start, end in [(0, 12), (12, 31)] + [(t, t + 1) for t in range(31, SEQ)]:  # crosses 32 positions
        ours = model(ids[:, start:end], cache=cache)
        reference = hf(ids[:, start:end], cache=theirs, use_cache=True).logits
        assert _max_diff(ours, reference) < 1e-4, start
    assert _max_diff(ours, hf(ids).logits[:, -1:]) > 1e-2  # the keys of the short-factor steps differ


def test_alibi_slopes_match_bloom():
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for heads in (1, 4, 6, 12, 16, 71, 112):  # powers of two and not (BLOOM-176B has 112 heads)
        assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu"))), heads


# ---- left padding --------------------------------------------------------------------------


def _left_padded(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    pad = torch.tensor([width - len(r) for r in rows])
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad_id), r]) for r in rows])
    return ids, pad


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2", "gemma2", "gemma3", "phi3", "falcon-new", "bloom"])
def test_left_padded_batch_equals_rows_alone(hf_checkpoint, name):
    _, path = hf_checkpoint(name)
    model = load_model(path)
    rows = [_ids(1, SEQ, seed=2)[0], _ids(1, 27, seed=3)[0], _ids(1, 5, seed=4)[0]]
    ids, pad = _left_padded(rows)
    with torch.no_grad():
        batched = model(ids, pad=pad)
        assert torch.isfinite(batched).all()  # padding queries must not produce NaN rows
        for i, row in enumerate(rows):
            alone = model(row[None])
            assert _max_diff(batched[i, pad[i]:], alone[0]) < 1e-5


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gemma3", "bloom"])
def test_left_padded_cached_decoding_equals_rows_alone(hf_checkpoint, name):
    _, path = hf_checkpoint(name)
    model = load_model(path)
    rows = [_ids(1, SEQ, seed=5)[0], _ids(1, 22, seed=6)[0]]
    ids, pad = _left_padded(rows)
    prompt = 20  # row 1 has only 2 real tokens in the prefill, then decodes past Mistral's window
    with torch.no_grad():
        cache = KVCache(model.config, 2, SEQ, dtype=torch.float32, device="cpu")
        pieces = [model(ids[:, :prompt], pad=pad, cache=cache)]
        pieces += [model(ids[:, t : t + 1], pad=pad, cache=cache) for t in range(prompt, SEQ)]
        decoded = torch.cat(pieces, dim=1)
        for i, row in enumerate(rows):
            alone = model(row[None])
            assert _max_diff(decoded[i, pad[i]:], alone[0]) < 1e-5


# ---- sizes of the real presets -------------------------------------------------------------

# Totals of the published checkpoints (tied embeddings counted once; the Hub's safetensors figures for
# falcon-7b and falcon-40b, 7.22B and 41.8B, also count the stored copy of their tied output head).
PUBLISHED = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "gpt2": 124_439_808,
    "gemma-2b": 2_506_172_416,  # google/gemma-2b (tied)
    "gemma2-2b": 2_614_341_888,  # google/gemma-2-2b (tied)
    "gemma3-1b": 999_885_952,  # google/gemma-3-1b-pt (tied)
    "qwen3-0.6b": 596_049_920,  # Qwen/Qwen3-0.6B (tied)
    "qwen3-8b": 8_190_735_360,  # Qwen/Qwen3-8B
    "yi-6b": 6_061_035_520,  # 01-ai/Yi-6B (Llama architecture)
    "llama3.2-1b": 1_235_814_400,  # meta-llama/Llama-3.2-1B (tied)
    "llama3.2-3b": 3_212_749_824,  # meta-llama/Llama-3.2-3B (tied)
    "phi3-mini": 3_821_079_552,  # Phi-3-mini-4k-instruct: "3.8B"
    "phi4-mini": 3_836_021_760,  # Phi-4-mini-instruct: "3.8B"
    "falcon-7b": 6_921_720_704,
    "falcon-40b": 41_303_293_952,
    "bloom-560m": 559_214_592,
    "bloom-7b1": 7_069_016_064,
}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_count_matches_transformers(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = Transformer(cfg)
        theirs = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**cfg.to_hf()))
    assert type(theirs).__name__ == cfg.to_hf()["architectures"][0]
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert _count(ours) == cfg.num_parameters() == _count(theirs) == PUBLISHED[name]
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    if cfg.position == "learned":
        embeddings += cfg.max_position_embeddings * cfg.hidden_size
    assert cfg.num_parameters(embeddings=False) == cfg.num_parameters() - embeddings


def test_mixtral_active_parameters():
    cfg = PRESETS["mixtral-8x7b"]
    inactive_experts = cfg.num_hidden_layers * (8 - 2) * 3 * 4096 * 14336
    embeddings = 2 * 32000 * 4096
    assert cfg.num_active_parameters() == cfg.num_parameters() - embeddings - inactive_experts
    assert round(cfg.num_active_parameters() + embeddings, -8) == 12_900_000_000  # "12.9B active"


def test_qwen3_moe_preset_counts():
    """Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active (counted, not built: 6144 experts take seconds on meta;
    the tiny native qwen3_moe config checks the same count against a built model and transformers')."""
    cfg = PRESETS["qwen3-30b-a3b"]
    assert cfg.num_parameters() == 30_532_122_624
    embeddings = 2 * 151936 * 2048
    inactive_experts = 48 * (128 - 8) * 3 * 2048 * 768
    assert cfg.num_active_parameters() == cfg.num_parameters() - embeddings - inactive_experts
    assert 3.3e9 <= cfg.num_active_parameters() + embeddings < 3.4e9  # "3.3B activated"


def test_kv_cache_bytes_per_token():
    assert PRESETS["llama2-7b"].kv_cache_bytes_per_token() == 2 * 32 * 32 * 128 * 2 == 524_288
    assert PRESETS["mistral-7b"].kv_cache_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131_072  # GQA: 8 KV heads
    assert PRESETS["llama2-7b"].kv_cache_bytes_per_token(bytes_per_value=4) == 2 * 32 * 32 * 128 * 4
    # The cache really holds that much: one token of every layer's K and V.
    cfg = PRESETS["micro"]
    cache = KVCache(cfg, 1, 1, dtype=torch.bfloat16, device="meta")
    assert (cache.k.numel() + cache.v.numel()) * 2 == cfg.kv_cache_bytes_per_token()


def test_flops_per_token_llama2_7b():
    d, layers, ffn, vocab, seq = 4096, 32, 11008, 32000, 4096
    per_layer = 4 * d * d + 3 * d * ffn  # attention, SwiGLU (norm gains multiply, they are no matmul)
    matmul = layers * per_layer + vocab * d  # + output head (the input embedding is a lookup)
    attention = 12 * layers * d * seq  # 12·L·H·Q·T (PaLM, appendix B)
    assert PRESETS["llama2-7b"].flops_per_token(seq) == 6 * matmul + attention == 6 * matmul + 6_442_450_944
    assert PRESETS["llama2-7b"].flops_per_token() == PRESETS["llama2-7b"].flops_per_token(4096)

