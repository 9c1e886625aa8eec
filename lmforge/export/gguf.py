"""Write a checkpoint directory as one GGUF file that llama.cpp (and Ollama, LM Studio, ...) loads.

Follows the conventions of llama.cpp's own `convert_hf_to_gguf.py`; each family becomes one of
llama.cpp's architectures (Llama, Mistral and Mixtral its `llama`; Qwen2, Qwen3, Qwen3-MoE, Gemma 1-3,
Phi-3, Falcon and BLOOM their own), described declaratively in `lmforge.export.gguf_archs`: tensor
names (`blk.N.attn_q.weight`, ...), fused projections, extra keys, and what the architecture cannot
express (refused with a one-line error). Experts are stacked into one tensor per projection; Gemma's
offset norms are written as `1 + weight`. llama.cpp's `llama` architecture rotates adjacent pairs of
each head's query/key features, where Hugging Face checkpoints rotate its two halves, so the q/k
projection rows are reordered on the way out (`interleave_rotary`); the others rotate halves and are
left as they are. Weights are written as f32 or f16; norms, biases and the MoE router stay f32 either
way, as llama.cpp's converter keeps them. The tokenizer goes into the same file: byte-level BPE
(`tokenizer.ggml.model = "gpt2"`, what lmforge trains) or a SentencePiece-style BPE with byte
fallback (`"llama"`, Llama 2's tokenizer.json), with its special-token ids and chat template.
T5-family directories (encoder-decoder, encoder-only) are written by `lmforge.export.gguf_t5`; both
end in `lmforge.export.gguf_write`'s atomic writer.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import Tensor

from lmforge.checkpoint import read_tensors, to_ours
from lmforge.config import ModelConfig
from lmforge.export.gguf_archs import TENSOR_NAMES, Arch, arch_of, llama3_rope_factors
from lmforge.export.gguf_t5 import export_t5_gguf, t5_arch
from lmforge.export.gguf_write import add_special_tokens, check_dtype, flatten_steps, write_gguf
from lmforge.tokenizer import Tokenizer

FUSIONS = (  # Arch flag, the fused module, its parts in row order
    ("fuse_qkv", "self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("fuse_gate_up", "mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
)

# tokenizer.json `Split` regexes (ahead of a regex-free ByteLevel) -> llama.cpp's pre-tokenizer names.
# A plain ByteLevel pre-tokenizer (GPT-2's regex; what lmforge trains) is llama.cpp's "gpt-2".
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",  # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
SPACE = "\u2581"  # SentencePiece's visible space


def export_gguf(checkpoint: str | Path, out: str | Path, *, dtype: str = "f16") -> Path:
    """Write the model and tokenizer of HF-format directory `checkpoint` to GGUF file `out` (atomically).
    T5-family directories (encoder-decoder or encoder-only) go to `lmforge.export.gguf_t5`."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_dtype(dtype)
    if t5_arch(checkpoint) is not None:
        return export_t5_gguf(checkpoint, out, dtype=dtype)
    config = ModelConfig.from_dir(checkpoint)
    arch = arch_of(config)
    _warn_approximations(config, arch)
    tokenizer = Tokenizer.from_dir(checkpoint)
    tensors = gguf_tensors(config, to_ours(config.family, read_tensors(checkpoint), config))

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        _add_hyperparameters(writer, config, arch)
        _add_tokenizer(writer, tokenizer, config)

    return write_gguf(out, arch.name, checkpoint.resolve().name, tensors, dtype, add_metadata)


def _warn_approximations(config: ModelConfig, arch: Arch) -> None:
    """What llama.cpp reads but computes differently (as its own converter accepts)."""
    if config.sliding_window is not None and not arch.sliding_window:
        warnings.warn(f"llama.cpp's {arch.name} architecture attends over the whole context: "
                      f"its outputs match this model's only within the sliding window ({config.sliding_window} tokens)",
                      stacklevel=3)
    if config.mlp == "gelu" and config.gelu_approximate == "none":
        warnings.warn(f"llama.cpp's {arch.name} architecture computes GELU by its tanh approximation: its outputs "
                      "differ slightly from this model's exact (erf) GELU", stacklevel=3)


# ---- tensors ---------------------------------------------------------------------------------


def interleave_rotary(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder each head's q/k rows from Hugging Face's rotary layout, where feature i pairs with
    i + head_dim/2, to llama.cpp's, where it pairs with its neighbour: row 2i + j of a head
    becomes the old row j * head_dim/2 + i."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _name_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{pattern}\\.(?P<kind>weight|bias)$")


def gguf_name(name: str, table: tuple[tuple[str, str], ...] = TENSOR_NAMES) -> tuple[str, int | None, int]:
    """llama.cpp's name for one of our tensors, its expert number (None unless stacked) and its
    position in `table` (our name template -> llama.cpp's)."""
    for position, (ours, theirs) in enumerate(table):
        if match := _name_regex(ours).match(name):
            groups = match.groupdict()
            expert = None if groups.get("e") is None else int(groups["e"])
            return f"{theirs.replace('{i}', groups.get('i') or '')}.{groups['kind']}", expert, position
    raise ValueError(f"tensor {name} has no GGUF counterpart")


def _prepared(config: ModelConfig, arch: Arch, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict with llama.cpp's values: offset norms as `1 + weight`, q/k rows interleaved
    where llama.cpp rotates pairs, fused projections concatenated."""
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # llama.cpp reuses token_embd
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        projection = name.rsplit(".", 2)[-2]
        if arch.interleaved_rope and projection in heads:
            tensor = interleave_rotary(tensor, heads[projection])
        if config.norm_offset and name.endswith("norm.weight"):
            tensor = tensor.float() + 1.0  # llama.cpp's RMSNorm multiplies by the weight itself
        out[name] = tensor
    for flag, fused, parts in FUSIONS:
        if getattr(arch, flag):
            for name in [n for n in out if f".{parts[0]}." in n]:
                out[name.replace(parts[0], fused)] = torch.cat([out.pop(name.replace(parts[0], p)) for p in parts])
    return out


def gguf_tensors(config: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict as llama.cpp's tensors for `config`'s architecture: values `_prepared`,
    renamed, experts stacked, plus the rope factor tensors of Llama-3 and LongRoPE scaling."""
    arch = arch_of(config)
    renames = arch.renames(config)
    table = tuple((ours, renames.get(ours, theirs)) for ours, theirs in TENSOR_NAMES)
    out: dict[str, Tensor] = {}
    order: dict[str, tuple[int, int, int, bool]] = {}
    experts: dict[str, dict[int, Tensor]] = {}
    for name, tensor in _prepared(config, arch, state).items():
        target, expert, position = gguf_name(name, table)
        layer = re.match(r"blk\.(\d+)\.", target)
        group = 1 if layer else 2 if position > 1 else 0
        order[target] = (group, int(layer[1]) if layer else 0, position, target.endswith(".bias"))
        if expert is None:
            out[target] = tensor
        else:
            experts.setdefault(target, {})[expert] = tensor
    for target, parts in experts.items():
        out[target] = torch.stack([parts[e] for e in range(len(parts))])
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = torch.tensor(llama3_rope_factors(config), dtype=torch.float32)
    if scaling.get("rope_type") == "longrope":
        out["rope_factors_long.weight"] = torch.tensor(scaling["long_factor"], dtype=torch.float32)
        out["rope_factors_short.weight"] = torch.tensor(scaling["short_factor"], dtype=torch.float32)
    return dict(sorted(out.items(), key=lambda item: order.get(item[0], (0, 0, -1, False))))


# ---- hyperparameters -------------------------------------------------------------------------


def _add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig, arch: Arch) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if config.position == "rope":
        writer.add_rope_dimension_count(config.rotary_dim)
        writer.add_rope_freq_base(config.rope_theta)
    if config.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(config.norm_eps)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    if (config.rope_scaling or {}).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    if config.num_experts:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    arch.keys(writer, config)


# ---- tokenizer -------------------------------------------------------------------------------


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, config: ModelConfig) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports BPE tokenizers only, not {model.get('type')} models")
    if model.get("byte_fallback"):
        _add_sentencepiece_vocab(writer, tokenizer, spec, config)
    else:
        _add_byte_level_vocab(writer, tokenizer, spec, config)
    add_special_tokens(writer, tokenizer, {
        "bos": tokenizer.bos_id if tokenizer.bos_id is not None else config.bos_token_id,
        "eos": tokenizer.eos_id if tokenizer.eos_id is not None else (config.eos_token_ids or [None])[0],
        "pad": tokenizer.pad_id if tokenizer.pad_id is not None else config.pad_token_id,
        "unk": tokenizer.token_to_id(tokenizer.special_tokens["unk_token"] or model.get("unk_token") or ""),
    })


def _vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order, padded to the model's vocab_size, and their llama.cpp token types."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size "
                         f"is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    return tokens, [int(t) for t in types]


def _merges(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """BPE merges in rank order (tokenizer.json holds "left right" strings or, since tokenizers 0.20, pairs)."""
    return [tuple(m.split(" ", 1) if isinstance(m, str) else m) for m in spec["model"].get("merges", [])]


def _add_byte_level_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, spec: dict[str, Any],
                          config: ModelConfig) -> None:
    pre = spec.get("pre_tokenizer") or {}
    normalizer = spec.get("normalizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        name = "gpt-2"
    elif (pre.get("type") == "Sequence" and len(pre["pretokenizers"]) == 2
          and pre["pretokenizers"][0].get("type") == "Split"
          and pre["pretokenizers"][1].get("type") == "ByteLevel"
          and not pre["pretokenizers"][1].get("use_regex", True)):
        regex = pre["pretokenizers"][0]["pattern"].get("Regex")
        if regex not in PRE_TOKENIZERS:
            raise ValueError(f"GGUF export does not know llama.cpp's name for the pre-tokenizer regex {regex!r} "
                             f"(known: GPT-2's, Llama 3's, Qwen2's)")
        name = PRE_TOKENIZERS[regex]
    else:
        raise ValueError(f"GGUF export supports byte-level BPE with GPT-2, Llama 3 or Qwen2 pre-tokenization; "
                         f"this tokenizer.json's pre_tokenizer is {json.dumps(pre)[:200]}")
    if normalizer.get("type") not in (None, "NFC"):
        raise ValueError(f"GGUF export of a byte-level tokenizer with a {normalizer['type']} normalizer is not "
                         "supported (llama.cpp would not apply it)")
    tokens, types = _vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{left} {right}" for left, right in _merges(spec)])


def _add_sentencepiece_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, spec: dict[str, Any],
                             config: ModelConfig) -> None:
    """A BPE tokenizer.json with byte fallback whose spaces are SentencePiece's "▁" (Llama 2's,
    Mistral's): llama.cpp's "llama" tokenizer merges the adjacent pair whose result scores
    highest, so each token scores minus the rank of the merge that makes it."""
    steps = flatten_steps(spec.get("normalizer")) + flatten_steps(spec.get("pre_tokenizer"))
    metaspace = [s for s in steps if s.get("type") == "Metaspace"]
    replaces_spaces = any(s.get("type") == "Replace" and s.get("pattern", {}).get("String") == " "
                          and s.get("content") == SPACE for s in steps) or bool(metaspace)
    if not replaces_spaces:
        raise ValueError("GGUF export supports byte-fallback BPE tokenizers only when they write spaces as "
                         f"SentencePiece's {SPACE!r} (Llama 2 style); this tokenizer.json does not")
    if any(s.get("type") not in ("Prepend", "Replace", "Metaspace") for s in steps):
        kinds = sorted({s.get("type", "?") for s in steps} - {"Prepend", "Replace", "Metaspace"})
        raise ValueError(f"GGUF export of SentencePiece-style tokenizers does not support {', '.join(kinds)} "
                         "normalizers/pre-tokenizers")
    add_space_prefix = any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in steps) or any(
        m.get("prepend_scheme", "always" if m.get("add_prefix_space", True) else "never") != "never"
        for m in metaspace)
    tokens, types = _vocab(tokenizer, config.vocab_size)
    scores = [0.0] * len(tokens)
    for rank, (left, right) in enumerate(_merges(spec)):
        token_id = tokenizer.token_to_id(left + right)
        if token_id is not None and scores[token_id] == 0.0:
            scores[token_id] = -float(rank + 1)
    unk = spec["model"].get("unk_token")
    for i, text in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types[i] = int(gguf.TokenType.BYTE)
        elif text == unk:
            types[i] = int(gguf.TokenType.UNKNOWN)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_space_prefix)
