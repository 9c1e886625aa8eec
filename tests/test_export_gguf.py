"""lmforge.export.gguf: every tensor, hyperparameter and tokenizer field read back with gguf's own
reader and checked against the checkpoint (the rotary row order computed here from its definition),
and, where llama-cpp-python is installed, llama.cpp's logits and tokens against lmforge's."""

from __future__ import annotations

import json
import re
import warnings

import gguf
import numpy as np
import pytest
import torch
from conftest import SHARPEN, VARIANTS
from hf_models import tiny_hf_model
from safetensors.torch import load_file
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.checkpoint import load_model, save_model
from lmforge.cli import main
from lmforge.export.gguf import export_gguf
from lmforge.model import Transformer
from lmforge.positions import rope_inv_freq
from lmforge.presets import preset
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

VOCAB = 300
TEXT = "the cat sat on the mat. the dog ate the bone! héllo wörld 👋 日本語 it's 1234 cats\n\n  spaced"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text((TEXT + "\n") * 30 + "the cat and the dog; the mat and the bone.\n" * 20)
    return train_tokenizer([corpus], VOCAB, tmp_path_factory.mktemp("tok"), show_progress=False)


def hf_checkpoint(name, path, tokenizer, vocab_size=VOCAB, **config):
    """A sharpened tiny transformers model of `name` (a family or a conftest variant; `config`), with `tokenizer`."""
    family, overrides = VARIANTS.get(name, (name, {}))
    model = tiny_hf_model(family, vocab_size=vocab_size, **overrides, **config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def lmforge_checkpoint(path, tokenizer, **overrides):
    """lmforge's own micro Llama (4 heads of 16, 2 KV heads), random norms, saved with save_model."""
    model = Transformer(preset("micro", vocab_size=VOCAB, **overrides))
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1) if p.dim() == 1 else p.mul_(SHARPEN)
    return save_model(model, path, tokenizer=tokenizer)


def export(checkpoint, out, dtype="f32"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sliding-window notes
        return gguf.GGUFReader(export_gguf(checkpoint, out, dtype=dtype))


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


# ---- what llama.cpp expects, written out independently of the exporter ---------------------------

GGUF_NAMES = [  # transformers' on-disk names (Mixtral's too) -> llama.cpp's
    (r"model\.embed_tokens\.", "token_embd."),
    (r"model\.norm\.", "output_norm."),
    (r"lm_head\.", "output."),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"blk.\1.attn_norm."),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"blk.\1.ffn_norm."),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.", r"blk.\1.attn_q."),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.", r"blk.\1.attn_k."),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.", r"blk.\1.attn_v."),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.", r"blk.\1.attn_output."),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.", r"blk.\1.ffn_gate."),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.", r"blk.\1.ffn_up."),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"blk.\1.ffn_down."),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.", r"blk.\1.ffn_gate_inp."),
]
EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
EXPERT_NAMES = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


def interleaved_rows(n_rows: int, n_heads: int) -> list[int]:
    """Per head, llama.cpp's row 2i + j is the checkpoint's row j * head_dim/2 + i: rotary pairs
    (i, i + head_dim/2) of Hugging Face's layout become adjacent (2i, 2i + 1)."""
    head_dim = n_rows // n_heads
    return [h * head_dim + j * (head_dim // 2) + i
            for h in range(n_heads) for i in range(head_dim // 2) for j in range(2)]


def expected_tensors(path, permute: bool) -> dict[str, torch.Tensor]:
    config = json.loads((path / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    disk = load_file(path / "model.safetensors")
    expected, experts = {}, {}
    for name, tensor in disk.items():
        if match := EXPERT.fullmatch(name):
            layer, expert, w = match.groups()
            experts.setdefault(f"blk.{layer}.{EXPERT_NAMES[w]}.weight", {})[int(expert)] = tensor
            continue
        target = next(re.sub(f"^{hf}", ours, name) for hf, ours in GGUF_NAMES if re.match(hf, name))
        kind = target.split(".")[-2]
        if permute and kind in heads:
            tensor = tensor[interleaved_rows(tensor.shape[0], heads[kind])]
        expected[target] = tensor.float()
    for target, parts in experts.items():
        expected[target] = torch.stack([parts[e] for e in sorted(parts)]).float()
    return expected


# ---- tensors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "mixtral", "llama-bias", "llama3-smooth"])
def test_every_tensor_round_trips(tokenizer, tmp_path, name):
    path = hf_checkpoint(name, tmp_path / name, tokenizer)
    reader = export(path, tmp_path / "model.gguf")
    got = {t.name: t for t in reader.tensors}
    expected = expected_tensors(path, permute=name != "qwen2")
    if name == "llama3-smooth":
        assert "rope_freqs.weight" in got  # checked in test_llama3_rope_factors
        del got["rope_freqs.weight"]
    assert sorted(got) == sorted(expected)
    for target, tensor in expected.items():
        assert list(got[target].shape) == list(reversed(tensor.shape)), target  # GGUF lists dims innermost first
        assert got[target].tensor_type == gguf.GGMLQuantizationType.F32
        torch.testing.assert_close(torch.from_numpy(np.array(got[target].data)), tensor, rtol=0, atol=0)
    if name == "qwen2":  # tied embeddings: llama.cpp reuses token_embd for the output
        assert "output.weight" not in got


def test_permutation_is_the_documented_one():
    # Head of 4: pairs (0, 2) and (1, 3) in HF's layout become rows (0, 1) and (2, 3).
    assert interleaved_rows(8, 2) == [0, 2, 1, 3, 4, 6, 5, 7]
    from lmforge.export.gguf import interleave_rotary

    w = torch.arange(24.0).reshape(12, 2)
    assert torch.equal(interleave_rotary(w, 2), w[interleaved_rows(12, 2)])


def test_f16_file_keeps_norms_biases_and_router_in_f32(tokenizer, tmp_path):
    for name in ("llama-bias", "mixtral"):
        path = hf_checkpoint(name, tmp_path / name, tokenizer)
        reader = export(path, tmp_path / f"{name}.gguf", dtype="f16")
        assert fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
        expected = expected_tensors(path, permute=True)
        for t in reader.tensors:
            keep_f32 = len(t.shape) == 1 or t.name.endswith("ffn_gate_inp.weight")
            want = gguf.GGMLQuantizationType.F32 if keep_f32 else gguf.GGMLQuantizationType.F16
            assert t.tensor_type == want, t.name
            value = torch.from_numpy(np.array(t.data))
            reference = expected[t.name] if keep_f32 else expected[t.name].half()
            torch.testing.assert_close(value, reference, rtol=0, atol=0)
    f32 = export(path, tmp_path / "f32.gguf", dtype="f32")
    assert fields(f32)["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert (tmp_path / "f32.gguf").stat().st_size > (tmp_path / "mixtral.gguf").stat().st_size * 1.5


def test_llama3_rope_factors_divide_the_frequencies(tokenizer, tmp_path):
    path = hf_checkpoint("llama3-smooth", tmp_path / "m", tokenizer)
    reader = export(path, tmp_path / "m.gguf")
    factors = torch.from_numpy(np.array(next(t.data for t in reader.tensors if t.name == "rope_freqs.weight")))
    config = load_model(path).config
    plain = rope_inv_freq(config.model_copy(update={"rope_scaling": None}))
    torch.testing.assert_close(plain / factors, rope_inv_freq(config))
    assert (factors == 1).any() and (factors == 8).any() and ((factors > 1) & (factors < 8)).any()


# ---- metadata ----------------------------------------------------------------------------------


def test_hyperparameters(tokenizer, tmp_path):
    path = lmforge_checkpoint(tmp_path / "micro", tokenizer, rope_theta=5e5, norm_eps=1e-6,
                              rope_scaling={"rope_type": "linear", "factor": 4.0})
    meta = fields(export(path, tmp_path / "micro.gguf"))
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "micro"
    assert {k: v for k, v in meta.items() if k.startswith("llama.")} == pytest.approx({
        "llama.vocab_size": VOCAB, "llama.context_length": 256, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 176, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16, "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 5e5,
        "llama.attention.layer_norm_rms_epsilon": 1e-6, "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 4.0,
    })

    qwen = fields(export(hf_checkpoint("qwen2", tmp_path / "q", tokenizer), tmp_path / "q.gguf"))
    assert qwen["general.architecture"] == "qwen2"
    assert qwen["qwen2.attention.head_count_kv"] == 2 and "qwen2.rope.scaling.type" not in qwen
    moe = fields(export(hf_checkpoint("mixtral", tmp_path / "x", tokenizer), tmp_path / "x.gguf"))
    assert moe["general.architecture"] == "llama"
    assert (moe["llama.expert_count"], moe["llama.expert_used_count"]) == (4, 2)


def test_tokenizer_fields_match_tokenizer_json(tokenizer, tmp_path):
    path = lmforge_checkpoint(tmp_path / "micro", tokenizer)
    meta = fields(export(path, tmp_path / "micro.gguf"))
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    assert len(meta["tokenizer.ggml.merges"]) > 10
    types = meta["tokenizer.ggml.token_type"]
    assert types[: len(SPECIAL_TOKENS)] == [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    assert set(types[len(SPECIAL_TOKENS):]) == {gguf.TokenType.NORMAL}
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (0, 1, 2)
    assert "tokenizer.ggml.unknown_token_id" not in meta
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template


def test_vocab_padded_to_the_model(tokenizer, tmp_path):
    path = hf_checkpoint("llama", tmp_path / "m", tokenizer, vocab_size=VOCAB + 20)
    meta = fields(export(path, tmp_path / "m.gguf"))
    assert len(meta["tokenizer.ggml.tokens"]) == VOCAB + 20
    assert meta["tokenizer.ggml.tokens"][VOCAB:] == [f"[PAD{i}]" for i in range(VOCAB, VOCAB + 20)]
    assert meta["tokenizer.ggml.token_type"][VOCAB:] == [gguf.TokenType.UNUSED] * 20


def spm_tokenizer(path) -> Tokenizer:
    """A Llama-2-style tokenizer.json: BPE with byte fallback, spaces written as "▁", a "▁" prefix."""
    backend = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials + bytes_, show_progress=False)
    backend.train_from_iterator([TEXT] * 20, trainer=trainer)
    tok = Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True})
    tok.save(path)
    return tok


SPLIT_REGEXES = {  # the pre-tokenizer regexes of Llama 3's and Qwen2's tokenizer.json
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def split_tokenizer(path, pre: str) -> Tokenizer:
    """A byte-level BPE whose words are split by a regex first, as Llama 3's and Qwen2's are."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT] * 20, trainer=trainer)
    tok = Tokenizer(backend, {"eos_token": "<|endoftext|>"})
    tok.save(path)
    return tok


@pytest.mark.parametrize("pre", sorted(SPLIT_REGEXES))
def test_regex_split_byte_level_tokenizers(tmp_path, pre):
    split_tokenizer(hf_checkpoint("llama", tmp_path / "m", None), pre)
    meta = fields(export(tmp_path / "m", tmp_path / "m.gguf"))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", pre)
    assert meta["tokenizer.ggml.eos_token_id"] == 0 and "tokenizer.ggml.bos_token_id" in meta  # config.json's


def test_sentencepiece_style_tokenizer(tmp_path):
    tok = spm_tokenizer(hf_checkpoint("llama", tmp_path / "m", None))
    meta = fields(export(tmp_path / "m", tmp_path / "m.gguf"))
    assert meta["tokenizer.ggml.model"] == "llama"
    vocab = tok.backend.get_vocab()
    assert meta["tokenizer.ggml.tokens"][: len(vocab)] == sorted(vocab, key=vocab.get)
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1:3] == [gguf.TokenType.CONTROL] * 2
    assert types[3:259] == [gguf.TokenType.BYTE] * 256
    assert meta["tokenizer.ggml.unknown_token_id"] == 0
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_space_prefix"] is True
    merges = json.loads((tmp_path / "m" / "tokenizer.json").read_text())["model"]["merges"]
    scores = meta["tokenizer.ggml.scores"]
    first, second = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges[:2])
    assert scores[vocab[first]] > scores[vocab[second]]  # the earlier merge wins in llama.cpp's SPM


# ---- errors, atomicity, CLI ----------------------------------------------------------------------


def test_unsupported_inputs_are_clear_errors(tokenizer, tmp_path):
    gpt2 = hf_checkpoint("gpt2", tmp_path / "gpt2", tokenizer)
    with pytest.raises(ValueError, match="gpt2 checkpoints are not supported for GGUF export yet"):
        export_gguf(gpt2, tmp_path / "x.gguf")
    small = hf_checkpoint("llama", tmp_path / "small", tokenizer, vocab_size=VOCAB - 10)
    with pytest.raises(ValueError, match="vocab_size is 290"):
        export_gguf(small, tmp_path / "x.gguf")
    (tmp_path / "small" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_gguf(small, tmp_path / "x.gguf")
    path = hf_checkpoint("llama", tmp_path / "ws", tokenizer)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="pre_tokenizer is .*Whitespace"):
        export_gguf(path, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="choose one of f32, f16"):
        export_gguf(path, tmp_path / "x.gguf", dtype="q4_0")
    assert not list(tmp_path.glob("*.gguf*"))


def test_failed_export_leaves_the_old_file(tokenizer, tmp_path, monkeypatch):
    path = hf_checkpoint("llama", tmp_path / "m", tokenizer)
    out = tmp_path / "out" / "m.gguf"
    export_gguf(path, out)
    before = out.read_bytes()
    import lmforge.export.gguf as module

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(module.gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(path, out, dtype="f16")
    assert out.read_bytes() == before
    assert [f.name for f in out.parent.iterdir()] == ["m.gguf"]


def test_sliding_window_warns(tokenizer, tmp_path):
    path = hf_checkpoint("mistral", tmp_path / "m", tokenizer)
    with pytest.warns(UserWarning, match="sliding window"):
        export_gguf(path, tmp_path / "m.gguf")


def test_cli_export(tokenizer, tmp_path, capsys):
    path = lmforge_checkpoint(tmp_path / "micro", tokenizer)
    out = tmp_path / "micro.gguf"
    assert main(["export", "gguf", "--checkpoint", str(path), "--out", str(out), "--dtype", "f32"]) == 0
    assert "written to" in capsys.readouterr().out
    assert fields(gguf.GGUFReader(out))["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert main(["export", "gguf", "--checkpoint", str(path), "--out", str(tmp_path / "d.gguf")]) == 0
    assert fields(gguf.GGUFReader(tmp_path / "d.gguf"))["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert main(["export", "gguf", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "lmforge export gguf: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "gguf", "--help"])
    assert "--dtype" in capsys.readouterr().out


# ---- llama.cpp itself (llama-cpp-python), where installed ----------------------------------------

try:
    import llama_cpp
except ImportError:  # an optional dev dependency: it builds llama.cpp from source
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")


def llama_cpp_model(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kwargs)


def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp_model(path, logits_all=True)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@torch.no_grad()
def lmforge_logits(path, ids: list[int], f16_weights: bool = False) -> torch.Tensor:
    model = load_model(path, dtype="float32")
    if f16_weights:  # what the f16 file holds: matrices rounded to f16, norms and biases exact
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(p.half().float())
    return model(torch.tensor([ids]))[0]


@needs_llama_cpp
@pytest.mark.parametrize("name", ["micro", "llama", "mistral", "qwen2", "mixtral", "llama-bias", "llama3-smooth"])
def test_llama_cpp_logits_match_lmforge(tokenizer, tmp_path, name):
    if name == "micro":
        path = lmforge_checkpoint(tmp_path / name, tokenizer)
    else:
        path = hf_checkpoint(name, tmp_path / name, tokenizer)
    ids = tokenizer.encode(TEXT)[: 8 if name == "mistral" else 40]  # llama.cpp has no sliding window
    export(path, tmp_path / "model.gguf")
    expected = lmforge_logits(path, ids)
    torch.testing.assert_close(llama_cpp_logits(tmp_path / "model.gguf", ids), expected, atol=1e-3, rtol=1e-4)


@needs_llama_cpp
def test_llama_cpp_sees_a_file_without_the_rotary_reordering(tokenizer, tmp_path, monkeypatch):
    # The check above can fail: written in Hugging Face's row order, the logits are far off.
    path = lmforge_checkpoint(tmp_path / "micro", tokenizer)
    monkeypatch.setattr("lmforge.export.gguf.interleave_rotary", lambda weight, n_heads: weight)
    export(path, tmp_path / "model.gguf")
    ids = tokenizer.encode(TEXT)[:40]
    assert (llama_cpp_logits(tmp_path / "model.gguf", ids) - lmforge_logits(path, ids)).abs().max() > 0.3


@needs_llama_cpp
def test_llama_cpp_reads_the_f16_file(tokenizer, tmp_path):
    path = hf_checkpoint("llama", tmp_path / "m", tokenizer)
    ids = tokenizer.encode(TEXT)[:40]
    export(path, tmp_path / "m.gguf", dtype="f16")
    expected = lmforge_logits(path, ids, f16_weights=True)
    # llama.cpp also rounds the activations to f16 for f16 matmuls.
    torch.testing.assert_close(llama_cpp_logits(tmp_path / "m.gguf", ids), expected, atol=1e-2, rtol=0)


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_lmforge(tokenizer, tmp_path):
    path = lmforge_checkpoint(tmp_path / "micro", tokenizer)
    export(path, tmp_path / "micro.gguf")
    llm = llama_cpp_model(tmp_path / "micro.gguf", vocab_only=True)
    texts = [TEXT, "  two  spaces, tabs\tand\nnewlines\n\n", "don't WE'LL 3.14159 ünïcödé 🙂🙂", "x"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids).decode() == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "the cat?"}], add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer.encode(chat)
    assert llm.token_bos() == 0 and llm.token_eos() == 1


@needs_llama_cpp
def test_llama_cpp_tokenizes_sentencepiece_style_like_tokenizers(tmp_path):
    tok = spm_tokenizer(hf_checkpoint("llama", tmp_path / "m", None))
    export(tmp_path / "m", tmp_path / "m.gguf")
    llm = llama_cpp_model(tmp_path / "m.gguf", vocab_only=True)
    for text in [TEXT, "the cat  sat", "ünknown bytes ☃ here", "mat."]:
        ids = tok.backend.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
    assert llm.tokenize(b"the", add_bos=True)[0] == 1


@needs_llama_cpp
@pytest.mark.parametrize("pre", sorted(SPLIT_REGEXES))
def test_llama_cpp_tokenizes_regex_split_byte_level_like_tokenizers(tmp_path, pre):
    tok = split_tokenizer(hf_checkpoint("llama", tmp_path / "m", None), pre)
    export(tmp_path / "m", tmp_path / "m.gguf")
    llm = llama_cpp_model(tmp_path / "m.gguf", vocab_only=True)
    for text in [TEXT, "it's 12345678 CATS'LL\r\n\n  go", "ünïcödé 🙂 x"]:
        ids = tok.backend.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text

