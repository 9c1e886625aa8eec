"""lmforge.export.gguf for T5 (v1.0: ReLU, tied and scaled head) and FLAN-T5 / T5 v1.1 (gated GELU,
untied head): every tensor against the checkpoint under the converter's own name table (gguf's
TensorNameMap), every key read back with gguf's reader, and llama.cpp (llama-cpp-python's low-level
llama_encode / llama_decode) against transformers: tokens, decoder logits, greedy output, and the
encoder-only `t5encoder` file's embeddings."""

from __future__ import annotations

import base64
import json
import warnings

import gguf
import numpy as np
import pytest
import torch
from conftest import SHARPEN
from safetensors.torch import load_file
from test_export_gguf import fields, needs_llama_cpp
from test_export_gguf_families import ggml_gelu
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Tokenizer
from transformers.activations import NewGELUActivation

from lmforge.cli import main
from lmforge.export.gguf import export_gguf
from lmforge.export.gguf_t5 import sentencepiece_normalizer

try:
    import llama_cpp
except ImportError:  # needs_llama_cpp skips
    llama_cpp = None

VOCAB = 48  # the tokenizer's 40 pieces + 2 sentinels, padded as T5 pads its vocabulary
TEXT = "the cat sat on the mat. the dog ate the bone! hello world it's 1234 cats"
# Fixed ids (the trained vocabulary orders pieces of near-equal score differently from run to run):
# a source with a sentinel, ending in </s>, and a decoder prefix from the start token 0.
SOURCE = [5, 9, 3, 17, 22, 8, 30, 12, 4, 27, 40, 6, 19, 33, 11, 25, 7, 14, 36, 21, 1]
PREFIX = [0, 10, 7, 33, 15, 21, 4]
VARIANTS = {  # llama.cpp buckets relative positions up to 128, fixed: the configs say so
    "v1.0": dict(feed_forward_proj="relu"),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def t5_config(**overrides) -> T5Config:
    return T5Config(**{**dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                              num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=128,
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), **overrides})


@pytest.fixture(scope="module")
def t5_tokenizer():
    """A Unigram tokenizer trained by `tokenizers` (<pad>=0, </s>=1, <unk>=2), as transformers' T5Tokenizer."""
    backend = HFTokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    backend.train_from_iterator([TEXT] * 30 + ["the cat and the dog; the mat and the bone."] * 20, trainer)
    vocab = json.loads(backend.to_str())["model"]["vocab"]
    # The trainer orders pieces of equal score as its threads meet them: rounded and sorted, one vocabulary.
    pieces = sorted(((piece, round(score, 6)) for piece, score in vocab[3:]), key=lambda ps: (-ps[1], ps[0]))
    return T5Tokenizer(vocab=[tuple(piece) for piece in vocab[:3]] + pieces, extra_ids=2)


def sharpened(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    return model


def t5_checkpoint(path, tokenizer, variant="v1.0", **overrides):
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config(**{**VARIANTS[variant], **overrides}))
    if variant == "v1.1":  # transformers 5 ties the head when building; FLAN-T5 checkpoints carry their own
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.05)
    sharpened(model)
    with torch.no_grad():  # GELU inputs within about ±1 (see test_llama_cpp_matches_transformers)
        for name, p in model.named_parameters():
            if name.endswith("wi_0.weight"):
                p.mul_(0.5 / SHARPEN)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(t5_tokenizer, tmp_path_factory):
    """Each variant's checkpoint and its f32 GGUF file, written once."""
    root = tmp_path_factory.mktemp("t5")
    out = {}
    for variant in VARIANTS:
        path = t5_checkpoint(root / variant, t5_tokenizer, variant)
        out[variant] = path, export_gguf(path, root / f"{variant}.gguf", dtype="f32")
    return out


# ---- the file, read back with gguf's reader ---------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_tensor_round_trips(checkpoints, variant):
    path, file = checkpoints[variant]
    disk = load_file(path / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, 2)  # what convert_hf_to_gguf.py maps by
    expected = {names.get_name(name, try_suffixes=(".weight",)): tensor for name, tensor in disk.items()}
    head = disk.get("lm_head.weight", disk["shared.weight"])
    expected["output.weight"] = head * 32 ** -0.5 if variant == "v1.0" else head  # transformers' scaling, folded
    got = {t.name: t for t in gguf.GGUFReader(file).tensors}
    assert sorted(got) == sorted(expected)
    assert ("enc.blk.0.ffn_gate.weight" in got) == (variant == "v1.1")
    assert "enc.blk.1.attn_rel_b.weight" not in got and "dec.blk.0.attn_rel_b.weight" in got  # block 0 only
    for name, tensor in expected.items():
        assert list(got[name].shape) == list(reversed(tensor.shape)), name
        torch.testing.assert_close(torch.from_numpy(np.array(got[name].data)), tensor, rtol=0, atol=0)


def test_hyperparameters_and_tokenizer(checkpoints, t5_tokenizer):
    meta = fields(gguf.GGUFReader(checkpoints["v1.1"][1]))
    assert meta["general.architecture"] == "t5"
    assert {k: meta[f"t5.{k}"] for k in (
        "context_length", "embedding_length", "feed_forward_length", "block_count", "decoder_block_count",
        "attention.head_count", "attention.key_length", "attention.value_length",
        "attention.relative_buckets_count", "decoder_start_token_id")} == {
        "context_length": 512, "embedding_length": 32, "feed_forward_length": 64, "block_count": 2,
        "decoder_block_count": 2, "attention.head_count": 4, "attention.key_length": 8,
        "attention.value_length": 8, "attention.relative_buckets_count": 8, "decoder_start_token_id": 0}
    assert meta["t5.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["t5.attention.layer_norm_epsilon"] == pytest.approx(1e-6)

    spec = json.loads(t5_tokenizer.backend_tokenizer.to_str())
    pieces = spec["model"]["vocab"]
    assert meta["tokenizer.ggml.model"] == "t5" and meta["tokenizer.ggml.pre"] == "default"
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[:40] == [p for p, _ in pieces] and tokens[40:42] == ["<extra_id_0>", "<extra_id_1>"]
    assert tokens[42:] == [f"[PAD{i}]" for i in range(42, VOCAB)]
    assert meta["tokenizer.ggml.scores"][:40] == pytest.approx([s for _, s in pieces])
    types = meta["tokenizer.ggml.token_type"]
    T = gguf.TokenType
    assert types[:4] == [T.CONTROL, T.CONTROL, T.UNKNOWN, T.NORMAL] and set(types[3:40]) == {T.NORMAL}
    assert types[40:42] == [T.USER_DEFINED] * 2 and set(types[42:]) == {T.UNUSED}
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.padding_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (1, 0, 2)
    assert "tokenizer.ggml.bos_token_id" not in meta
    assert (meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.add_eos_token"]) == (False, True)
    assert meta["tokenizer.ggml.add_space_prefix"] and meta["tokenizer.ggml.remove_extra_whitespaces"]
    assert "tokenizer.ggml.precompiled_charsmap" not in meta  # this tokenizer.json has no Precompiled step

    meta = fields(gguf.GGUFReader(checkpoints["v1.0"][1]))
    assert "t5.feed_forward_length" in meta and meta["tokenizer.ggml.tokens"] == tokens


def test_normalizer_spec_from_tokenizer_json():
    """T5's own tokenizer.json: Precompiled charsmap, `" {2,}"` collapsed, Metaspace prepending."""
    steps = [{"type": "Precompiled", "precompiled_charsmap": base64.b64encode(b"\x01\x02map").decode()},
             {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
             {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}]
    assert sentencepiece_normalizer(steps) == (b"\x01\x02map", True, True)
    steps[2]["prepend_scheme"] = "never"
    assert sentencepiece_normalizer(steps[1:]) == (b"", False, True)
    with pytest.raises(ValueError, match="does not support NFKC"):
        sentencepiece_normalizer([*steps, {"type": "NFKC"}])


def test_f16_and_cli(checkpoints, tmp_path, capsys):
    path, _ = checkpoints["v1.1"]
    out = tmp_path / "t5.gguf"
    assert main(["export", "gguf", "--checkpoint", str(path), "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert kinds["dec.blk.0.cross_attn_k.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["dec.blk.0.attn_rel_b.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["enc.output_norm.weight"] == kinds["dec.blk.1.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("overrides, message", [
    (dict(relative_attention_max_distance=20), "relative_attention_max_distance=20 cannot be expressed"),
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj='gated-silu' cannot be expressed"),
])
def test_what_llama_cpp_cannot_express_is_refused(t5_tokenizer, tmp_path, overrides, message):
    path = t5_checkpoint(tmp_path / "m", t5_tokenizer, **overrides)
    with pytest.raises(ValueError, match=message):
        export_gguf(path, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


# ---- llama.cpp itself -----------------------------------------------------------------------------


def llama_cpp_t5(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32, **kwargs)


def encode(llm, ids: list[int]) -> None:
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    assert llama_cpp.llama_encode(llm.ctx, llama_cpp.llama_batch_get_one(tokens, len(ids))) == 0


def decoder_logits(llm, ids: list[int], start: int = 0) -> torch.Tensor:
    """llama.cpp's decoder logits at every position of `ids` (positions from `start`), in one batch."""
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, True
            batch.seq_id[i][0] = 0
        assert llama_cpp.llama_decode(llm.ctx, batch) == 0
        vocab = llm.n_vocab()
        return torch.tensor([llama_cpp.llama_get_logits_ith(llm.ctx, i)[:vocab] for i in range(len(ids))])
    finally:
        llama_cpp.llama_batch_free(batch)


@needs_llama_cpp
@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_cpp_matches_transformers(checkpoints, monkeypatch, variant):
    path, file = checkpoints[variant]
    # llama.cpp's GELU is a table over f16 inputs: emulated here. An input within 1e-6 of an f16 rounding
    # boundary may still round the other way there, moving that activation by one f16 step: the gate's
    # inputs are kept small (t5_checkpoint), where that step (<= 2^-11) keeps the logits within 1e-3.
    monkeypatch.setattr(NewGELUActivation, "forward", lambda self, x: ggml_gelu(x))
    # In float64, so the comparison measures llama.cpp's rounding alone, not also this CPU's fp32 kernels'
    # (T5's unscaled attention lets those reach 1.9e-3 here with ATen's default kernels).
    model = T5ForConditionalGeneration.from_pretrained(path).double().eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([SOURCE]), decoder_input_ids=torch.tensor([PREFIX])).logits[0].float()
        # Greedy, <pad> (the start token) barred: this tied random model would repeat it.
        reply = model.generate(torch.tensor([SOURCE]), max_new_tokens=8, do_sample=False, num_beams=1,
                               suppress_tokens=[0])[0].tolist()

    llm = llama_cpp_t5(file, logits_all=True)
    try:
        assert llama_cpp.llama_model_has_encoder(llm.model)
        assert llama_cpp.llama_model_decoder_start_token(llm.model) == 0
        encode(llm, SOURCE)
        torch.testing.assert_close(decoder_logits(llm, PREFIX), expected, atol=1e-3, rtol=1e-4)
    finally:
        llm.close()

    llm = llama_cpp_t5(file)
    try:
        encode(llm, SOURCE)
        ours = [0]  # the decoder start token, then one token a step (transformers stops at </s>)
        for _ in range(len(reply) - 1):
            logits = decoder_logits(llm, ours[-1:], start=len(ours) - 1)[-1]
            ours.append(int(logits[1:].argmax()) + 1)
    finally:
        llm.close()
    assert ours == reply


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_transformers(checkpoints, t5_tokenizer):
    llm = llama_cpp_t5(checkpoints["v1.0"][1], vocab_only=True)
    try:
        for text in [TEXT, "  two   spaces  and a tail  ", "the <extra_id_0> sat <extra_id_1>", "zebra qux", "x"]:
            ids = t5_tokenizer(text).input_ids
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text  # T5 appends </s>
            if 2 not in ids:  # llama.cpp writes <unk> as nothing
                assert llm.detokenize(ids[:-1]).decode().strip() == t5_tokenizer.decode(ids[:-1]), text
    finally:
        llm.close()


@needs_llama_cpp
def test_encoder_only_model(t5_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = sharpened(T5EncoderModel(t5_config(feed_forward_proj="relu")))
    model.save_pretrained(tmp_path / "enc")
    t5_tokenizer.save_pretrained(tmp_path / "enc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reader = gguf.GGUFReader(export_gguf(tmp_path / "enc", tmp_path / "enc.gguf", dtype="f32"))
    names = {t.name for t in reader.tensors}
    assert fields(reader)["general.architecture"] == "t5encoder"
    assert "output.weight" not in names and not any(n.startswith("dec.") for n in names)
    assert "t5encoder.decoder_start_token_id" not in fields(reader)

    model = T5EncoderModel.from_pretrained(tmp_path / "enc").eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([SOURCE])).last_hidden_state[0]
    llm = llama_cpp_t5(tmp_path / "enc.gguf", embedding=True)
    try:
        encode(llm, SOURCE)
        embeddings = llama_cpp.llama_get_embeddings(llm.ctx)
        got = torch.tensor(embeddings[: len(SOURCE) * 32]).reshape(len(SOURCE), 32)
    finally:
        llm.close()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
