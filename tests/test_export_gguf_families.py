"""lmforge.export.gguf for the families beyond Llama and Qwen2 (Gemma 1-3, Qwen3, Qwen3-MoE, Phi-3,
Falcon, BLOOM): llama.cpp's logits and greedy tokens against lmforge's, each architecture's tensors
and keys read back with gguf's reader against the transformers checkpoint, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
import test_export_gguf
from test_export_gguf import (
    TEXT, export, fields, hf_checkpoint, llama_cpp_logits, llama_cpp_model, lmforge_logits, needs_llama_cpp,
)

import lmforge.model
from lmforge.checkpoint import load_model
from lmforge.export.gguf import export_gguf

tokenizer = test_export_gguf.tokenizer  # the module-scoped byte-level BPE fixture, trained once here too


# Each tiny model as llama.cpp's architecture can express it: Gemma ties its head (llama.cpp reuses
# token_embd), Gemma 2/3 scale queries by head_dim^-1/2 (llama.cpp's rule below the 27B layer count),
# Qwen3-MoE renormalises its experts in every layer, Falcon has no biases and uses tanh GELU (llama.cpp's
# only GELU). Each: (config overrides, prompt length): Phi-3's within its 16-token window (llama.cpp
# disables Phi's sliding window), LongRoPE's past original_max_position_embeddings=32 (llama.cpp picks
# the long factors by context size, 64 here; lmforge, by position).
NEW_FAMILIES = {
    "gemma": (dict(tie_word_embeddings=True), 40),
    "gemma2": (dict(query_pre_attn_scalar=16), 40),
    "gemma3": (dict(query_pre_attn_scalar=16), 40),
    "qwen3": ({}, 40),
    "qwen3_moe": (dict(mlp_only_layers=[], norm_topk_prob=True), 40),
    "phi3": ({}, 8),
    "phi3-longrope": ({}, 40),
    "falcon": (dict(activation="gelu_pytorch_tanh"), 40),
    "falcon-new": (dict(bias=False, activation="gelu_pytorch_tanh"), 40),
    "bloom": ({}, 40),
}


TORCH_GELU = torch.nn.functional.gelu


def ggml_gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU as ggml's CPU backend computes it: a table of tanh GELU over f16 inputs, in f16
    (exact outside (-10, 10)). lmforge's f32 GELU differs from it by ~1e-3 in these logits."""
    table = TORCH_GELU(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


@needs_llama_cpp
@pytest.mark.parametrize("name", sorted(NEW_FAMILIES))
def test_llama_cpp_matches_lmforge_on_every_family(tokenizer, tmp_path, monkeypatch, name):
    overrides, n = NEW_FAMILIES[name]
    # Not named "phi3": llama.cpp then looks up Phi-3's own special tokens in the vocabulary.
    path = hf_checkpoint(name, tmp_path / "model", tokenizer, **overrides)
    export(path, tmp_path / "model.gguf")
    monkeypatch.setitem(lmforge.model.GATE_ACTIVATIONS, "gelu_pytorch_tanh", ggml_gelu)
    monkeypatch.setattr(lmforge.model.F, "gelu", ggml_gelu)
    ids = tokenizer.encode(TEXT)[:n]
    expected = lmforge_logits(path, ids)
    torch.testing.assert_close(llama_cpp_logits(tmp_path / "model.gguf", ids), expected, atol=1e-3, rtol=1e-4)

    steps = 16 - n if name == "phi3" else 6
    model, ours = load_model(path, dtype="float32"), list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ours.append(int(model(torch.tensor([ours]))[0, -1].argmax()))
    llm = llama_cpp_model(tmp_path / "model.gguf")
    theirs = [t for t, _ in zip(llm.generate(ids, top_k=1, temp=0.0), range(steps))]
    assert theirs == ours[n:]


def test_new_families_tensors_and_keys(tokenizer, tmp_path):
    """llama.cpp's spelling of each family, against the transformers checkpoint on disk."""
    def written(name, **overrides):
        path = hf_checkpoint(name, tmp_path / name, tokenizer, **overrides)
        reader = export(path, tmp_path / f"{name}.gguf")
        tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
        return load_file(path / "model.safetensors"), tensors, fields(reader)

    disk, got, meta = written("gemma2", query_pre_attn_scalar=16)
    assert meta["general.architecture"] == "gemma2" and "output.weight" not in got
    assert torch.equal(got["blk.0.attn_norm.weight"], disk["model.layers.0.input_layernorm.weight"] + 1)
    post_attention = disk["model.layers.1.post_attention_layernorm.weight"]
    assert torch.equal(got["blk.1.post_attention_norm.weight"], post_attention + 1)
    assert torch.equal(got["blk.1.ffn_norm.weight"], disk["model.layers.1.pre_feedforward_layernorm.weight"] + 1)
    assert torch.equal(got["blk.1.post_ffw_norm.weight"], disk["model.layers.1.post_feedforward_layernorm.weight"] + 1)
    assert torch.equal(got["blk.0.attn_q.weight"], disk["model.layers.0.self_attn.q_proj.weight"])  # halves kept
    assert (meta["gemma2.attn_logit_softcapping"], meta["gemma2.final_logit_softcapping"],
            meta["gemma2.attention.sliding_window"]) == (20.0, 10.0, 8)

    disk, got, meta = written("gemma3", query_pre_attn_scalar=16)
    assert torch.equal(got["blk.2.attn_k_norm.weight"], disk["model.layers.2.self_attn.k_norm.weight"] + 1)
    assert (meta["gemma3.rope.freq_base"], meta["gemma3.rope.freq_base_swa"]) == (10000.0, 100.0)
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, True, False]
    assert (meta["gemma3.rope.scaling.type"], meta["gemma3.rope.scaling.factor"]) == ("linear", 2.0)

    disk, got, meta = written("qwen3")
    assert torch.equal(got["blk.0.attn_q_norm.weight"], disk["model.layers.0.self_attn.q_norm.weight"])
    assert meta["qwen3.attention.key_length"] == 16

    disk, got, meta = written("phi3-longrope")
    assert torch.equal(got["blk.0.attn_qkv.weight"], disk["model.layers.0.self_attn.qkv_proj.weight"])
    assert torch.equal(got["blk.0.ffn_up.weight"], disk["model.layers.0.mlp.gate_up_proj.weight"])  # gate rows first
    assert got["rope_factors_long.weight"].tolist() == [1.5, 4.0, 12.0]
    assert got["rope_factors_short.weight"].tolist() == [1.0, 1.5, 2.5]
    assert (meta["phi3.rope.dimension_count"], meta["phi3.rope.scaling.original_context_length"]) == (6, 32)
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(128 / 32) / np.log(32)) ** 0.5)

    disk, got, meta = written("falcon-new", bias=False)
    layer = "transformer.h.0."
    assert torch.equal(got["blk.0.attn_norm_2.weight"], disk[layer + "ln_attn.weight"])  # feeds attention
    assert torch.equal(got["blk.0.attn_norm.bias"], disk[layer + "ln_mlp.bias"])  # feeds the MLP
    groups = disk[layer + "self_attention.query_key_value.weight"].reshape(2, 4, 8, 32)  # 2 KV groups: q, q, k, v
    qkv = torch.cat([groups[:, :2].reshape(-1, 32), groups[:, 2].reshape(-1, 32), groups[:, 3].reshape(-1, 32)])
    assert torch.equal(got["blk.0.attn_qkv.weight"], qkv)
    assert meta["falcon.attention.head_count_kv"] == 2
    assert meta["falcon.attention.layer_norm_epsilon"] == pytest.approx(1e-5)

    disk, got, meta = written("bloom")
    assert torch.equal(got["token_embd_norm.bias"], disk["transformer.word_embeddings_layernorm.bias"])
    heads = disk["transformer.h.0.self_attention.query_key_value.bias"].reshape(4, 3, 8)  # per head: q, k, v
    assert torch.equal(got["blk.0.attn_qkv.bias"], heads.transpose(0, 1).reshape(-1))
    assert "bloom.rope.freq_base" not in meta and "output.weight" not in got


@pytest.mark.parametrize("name, overrides, message", [
    ("gemma", {}, "cannot express an untied lm_head"),  # gemma3 reads an `output` tensor
    ("gemma2", {}, "cannot express query_pre_attn_scalar=12"),
    ("qwen3_moe", {}, "cannot express dense MLP layers"),
    ("qwen3_moe", dict(mlp_only_layers=[]), "cannot express norm_topk_prob=false"),
    ("falcon-new", {}, "cannot express biases"),
])
def test_what_llama_cpp_cannot_express_is_refused(tokenizer, tmp_path, name, overrides, message):
    path = hf_checkpoint(name, tmp_path / name, tokenizer, **overrides)
    with pytest.raises(ValueError, match=message):
        export_gguf(path, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_approximations_warn(tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="tanh approximation"):
        export_gguf(hf_checkpoint("falcon", tmp_path / "f", tokenizer), tmp_path / "f.gguf")
    with pytest.warns(UserWarning, match="sliding window"):
        export_gguf(hf_checkpoint("phi3", tmp_path / "p", tokenizer), tmp_path / "p.gguf")
