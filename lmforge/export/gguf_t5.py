"""T5 and FLAN-T5 as GGUF files for llama.cpp's `t5` architecture (`t5encoder` for an encoder-only
`T5EncoderModel`), following the `T5Model` class of llama.cpp's `convert_hf_to_gguf.py`.

The directory's `config.json` and tensors are read as transformers wrote them. Tensor names: the one
token embedding (`shared`, or the first of the stacks' copies) is `token_embd`; each encoder block's
sublayers are `enc.blk.N.attn_*` (self-attention, with `attn_rel_b`, the relative-position bias, in
block 0 only) and `enc.blk.N.ffn_*`, each decoder block's `dec.blk.N.attn_*`, `dec.blk.N.cross_attn_*`
and `dec.blk.N.ffn_*`; the final norms are `enc.output_norm` and `dec.output_norm`. A gated-GELU FFN
(T5 v1.1, FLAN-T5) has `ffn_gate` (wi_0) beside `ffn_up` (wi_1); without it llama.cpp runs ReLU.

One departure from the converter: transformers multiplies the decoder's output by d_model^-0.5 ahead
of the head when `scale_decoder_outputs` (T5 v1.0, tied embeddings) and llama.cpp's graph does not,
so the `output` tensor is written with that factor folded in (always written; the head, or the
embedding it is tied to), and llama.cpp's logits equal transformers'.

The tokenizer is tokenizer.json's SentencePiece Unigram model, as llama.cpp's `t5` tokenizer reads
it: pieces with their scores and types, the precompiled charsmap of a `Precompiled` normalizer,
whether a space is prefixed (Metaspace) and runs of whitespace collapsed (WhitespaceSplit, or a
`" {2,}"` Replace); special tokens are control tokens, the other added tokens (T5's sentinels
`<extra_id_N>`) user-defined, so llama.cpp matches them in text as transformers does.
"""

from __future__ import annotations

import base64
import json
import re
import warnings
from pathlib import Path
from typing import Any

import gguf
from torch import Tensor

from lmforge.checkpoint import read_tensors
from lmforge.export.gguf_write import add_special_tokens, check_dtype, flatten_steps, write_gguf
from lmforge.tokenizer import Tokenizer

T5_ARCHITECTURES = {  # config.json `architectures` -> llama.cpp architecture
    "T5ForConditionalGeneration": "t5", "T5WithLMHeadModel": "t5", "MT5ForConditionalGeneration": "t5",
    "T5EncoderModel": "t5encoder", "MT5EncoderModel": "t5encoder",
}
MAX_DISTANCE = 128  # llama.cpp buckets relative positions with this max distance, fixed
EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
SELF_ATTENTION = {"layer_norm": "attn_norm", "SelfAttention.q": "attn_q", "SelfAttention.k": "attn_k",
                  "SelfAttention.v": "attn_v", "SelfAttention.o": "attn_o",
                  "SelfAttention.relative_attention_bias": "attn_rel_b"}
CROSS_ATTENTION = {"layer_norm": "cross_attn_norm", "EncDecAttention.q": "cross_attn_q",
                   "EncDecAttention.k": "cross_attn_k", "EncDecAttention.v": "cross_attn_v",
                   "EncDecAttention.o": "cross_attn_o", "EncDecAttention.relative_attention_bias": "cross_attn_rel_b"}
FFN = {"layer_norm": "ffn_norm", "DenseReluDense.wi": "ffn_up", "DenseReluDense.wi_0": "ffn_gate",
       "DenseReluDense.wi_1": "ffn_up", "DenseReluDense.wo": "ffn_down"}
STACKS = {  # transformers' stack -> llama.cpp's prefix and, by `layer.J`, the sublayer names
    "encoder": ("enc", (SELF_ATTENTION, FFN)),
    "decoder": ("dec", (SELF_ATTENTION, CROSS_ATTENTION, FFN)),
}
BLOCK = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)\.weight")
TOKENIZER_STEPS = {"Precompiled", "WhitespaceSplit", "Metaspace", "Strip", "Replace", "Prepend"}
SPACE = "\u2581"  # SentencePiece's visible space


def t5_arch(checkpoint: Path) -> str | None:
    """llama.cpp's architecture for the T5-family directory `checkpoint` (from config.json's
    `architectures`), or None for any other directory."""
    file = checkpoint / "config.json"
    if not file.is_file():
        return None
    architectures = json.loads(file.read_text("utf-8")).get("architectures") or []
    return next((T5_ARCHITECTURES[a] for a in architectures if a in T5_ARCHITECTURES), None)


def export_t5_gguf(checkpoint: str | Path, out: str | Path, *, dtype: str = "f16") -> Path:
    """Write the T5-family model and tokenizer of HF-format directory `checkpoint` to GGUF file `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_dtype(dtype)
    arch = t5_arch(checkpoint)
    if arch is None:
        raise ValueError(f"{checkpoint / 'config.json'}: architectures names no T5 model "
                         f"(supported: {', '.join(T5_ARCHITECTURES)})")
    config = json.loads((checkpoint / "config.json").read_text("utf-8"))
    _check(checkpoint, config)
    tokenizer = Tokenizer.from_dir(checkpoint)
    tensors = t5_tensors(config, read_tensors(checkpoint), encoder_only=arch == "t5encoder")

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        _add_hyperparameters(writer, config, encoder_only=arch == "t5encoder")
        _add_tokenizer(writer, tokenizer, config)

    return write_gguf(out, arch, checkpoint.resolve().name, tensors, dtype, add_metadata)


def _activation(config: dict[str, Any]) -> tuple[bool, str]:
    """Whether the FFN is gated, and its activation, as transformers' T5Config reads `feed_forward_proj`."""
    proj = config.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    return gated, "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]


def _check(checkpoint: Path, config: dict[str, Any]) -> None:
    """Refuse what llama.cpp's t5 graph cannot express; warn where it only approximates."""
    file = checkpoint / "config.json"
    distance = config.get("relative_attention_max_distance", MAX_DISTANCE)
    if distance != MAX_DISTANCE:
        raise ValueError(f"{file}: relative_attention_max_distance={distance} cannot be expressed by llama.cpp's "
                         f"t5 architecture (it buckets relative positions up to {MAX_DISTANCE})")
    gated, act = _activation(config)
    if (gated and act not in ("gelu", "gelu_new", "gelu_pytorch_tanh")) or (not gated and act != "relu"):
        raise ValueError(f"{file}: feed_forward_proj={config.get('feed_forward_proj')!r} cannot be expressed by "
                         "llama.cpp's t5 architecture (it runs gated GELU or plain ReLU)")
    if act == "gelu":
        warnings.warn("llama.cpp's t5 architecture computes GELU by its tanh approximation: its outputs differ "
                      "slightly from this model's exact (erf) GELU", stacklevel=3)


def scales_decoder_output(config: dict[str, Any]) -> bool:
    """Whether transformers multiplies the decoder's output by d_model^-0.5 ahead of the head (T5 v1.0)."""
    return bool(config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True) is not False))


def t5_tensors(config: dict[str, Any], disk: dict[str, Tensor], *, encoder_only: bool = False) -> dict[str, Tensor]:
    """A T5 checkpoint's tensors (transformers' names) under llama.cpp's names, in file order:
    the embedding, the encoder's blocks and norm, the decoder's, then the (scaled) output head."""
    embedding = next((disk[name] for name in EMBEDDINGS if name in disk), None)
    if embedding is None:
        raise ValueError(f"the checkpoint has no token embedding (none of {', '.join(EMBEDDINGS)})")
    out: dict[str, Tensor] = {"token_embd.weight": embedding}
    order: dict[str, tuple[int, int, int]] = {"token_embd.weight": (0, 0, 0)}
    for position, (name, tensor) in enumerate(disk.items()):
        if name in EMBEDDINGS or name == "lm_head.weight" or (encoder_only and name.startswith("decoder.")):
            continue
        if match := BLOCK.fullmatch(name):
            stack, block, layer, sublayer = match[1], int(match[2]), int(match[3]), match[4]
            prefix, layers = STACKS[stack]
            if layer >= len(layers) or sublayer not in layers[layer]:
                raise ValueError(f"tensor {name} has no GGUF counterpart")
            target = f"{prefix}.blk.{block}.{layers[layer][sublayer]}.weight"
            order[target] = (1 + 2 * list(STACKS).index(stack), block, position)
        elif match := re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", name):
            target = f"{STACKS[match[1]][0]}.output_norm.weight"
            order[target] = (2 + 2 * list(STACKS).index(match[1]), 0, 0)
        else:
            raise ValueError(f"tensor {name} has no GGUF counterpart")
        out[target] = tensor
    if not encoder_only:
        head = disk.get("lm_head.weight", embedding).float()
        out["output.weight"] = head * config["d_model"] ** -0.5 if scales_decoder_output(config) else head
        order["output.weight"] = (5, 0, 0)
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))


def _add_hyperparameters(writer: gguf.GGUFWriter, config: dict[str, Any], *, encoder_only: bool) -> None:
    writer.add_context_length(config.get("n_positions") or 512)  # T5 has no position limit; 512 as trained
    writer.add_embedding_length(config["d_model"])
    writer.add_feed_forward_length(config["d_ff"])
    writer.add_block_count(config["num_layers"])
    if not encoder_only and config.get("num_decoder_layers") is not None:
        writer.add_decoder_block_count(config["num_decoder_layers"])
    writer.add_head_count(config["num_heads"])
    writer.add_key_length(config["d_kv"])
    writer.add_value_length(config["d_kv"])
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-6))
    writer.add_relative_attn_buckets_count(config.get("relative_attention_num_buckets", 32))
    writer.add_layer_norm_rms_eps(config.get("layer_norm_epsilon", 1e-6))
    if not encoder_only:
        writer.add_decoder_start_token_id(config.get("decoder_start_token_id", config.get("pad_token_id", 0)))


# ---- tokenizer -------------------------------------------------------------------------------


def sentencepiece_normalizer(steps: list[dict[str, Any]]) -> tuple[bytes, bool, bool]:
    """tokenizer.json's normalizer and pre-tokenizer steps as SentencePiece's normalizer spec:
    the precompiled charsmap, add_space_prefix, remove_extra_whitespaces."""
    unknown = sorted({s.get("type", "?") for s in steps} - TOKENIZER_STEPS)
    if unknown:
        raise ValueError(f"GGUF export of a Unigram tokenizer does not support {', '.join(unknown)} "
                         "normalizers/pre-tokenizers (llama.cpp's t5 tokenizer would not apply them)")
    metaspace = [s for s in steps if s.get("type") == "Metaspace"]
    if not metaspace:
        raise ValueError(f"GGUF export supports Unigram tokenizers that write spaces as SentencePiece's {SPACE!r} "
                         "(a Metaspace pre-tokenizer); this tokenizer.json has none")
    charsmap = b"".join(base64.b64decode(s.get("precompiled_charsmap") or "") for s in steps
                        if s.get("type") == "Precompiled")
    add_space_prefix = any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in steps) or any(
        m.get("prepend_scheme", "always" if m.get("add_prefix_space", True) else "never") != "never"
        for m in metaspace)
    collapses = any(s.get("type") == "WhitespaceSplit" for s in steps) or any(
        s.get("type") == "Replace" and s.get("pattern", {}).get("Regex") == " {2,}" for s in steps)
    return charsmap, add_space_prefix, collapses


def _vocab(tokenizer: Tokenizer, model: dict[str, Any], vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces in id order, padded to vocab_size as the converter pads, with their scores and llama.cpp types."""
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [int(gguf.TokenType.UNUSED)] * vocab_size
    added = tokenizer.backend.get_added_tokens_decoder()
    top = max([len(model["vocab"]) - 1, *added])
    if top >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {top} but the model's vocab_size is {vocab_size}")
    for i, (piece, score) in enumerate(model["vocab"]):
        tokens[i], scores[i], types[i] = piece, float(score), int(gguf.TokenType.NORMAL)
        if model.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            types[i] = int(gguf.TokenType.BYTE)
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} - {None}
    for i, token in added.items():
        if i >= len(model["vocab"]):
            tokens[i], scores[i] = token.content, -1000.0
        types[i] = int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED)
    if model.get("unk_id") is not None:
        types[model["unk_id"]] = int(gguf.TokenType.UNKNOWN)
    return tokens, scores, types


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, config: dict[str, Any]) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "Unigram":
        raise ValueError(f"GGUF export of T5 models supports SentencePiece Unigram tokenizers only, "
                         f"not {model.get('type')} models")
    charsmap, add_space_prefix, collapses = sentencepiece_normalizer(
        flatten_steps(spec.get("normalizer")) + flatten_steps(spec.get("pre_tokenizer")))
    tokens, scores, types = _vocab(tokenizer, model, config["vocab_size"])
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_space_prefix)
    writer.add_remove_extra_whitespaces(collapses)
    if charsmap:
        writer.add_precompiled_charsmap(charsmap)
    eos = config.get("eos_token_id")
    add_special_tokens(writer, tokenizer, {
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id if tokenizer.eos_id is not None else eos[0] if isinstance(eos, list) else eos,
        "pad": tokenizer.pad_id if tokenizer.pad_id is not None else config.get("pad_token_id"),
        "unk": model.get("unk_id"),
    })
