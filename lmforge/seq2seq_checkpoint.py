"""Hugging Face directories of encoder-decoder models: load `T5ForConditionalGeneration` and `T5EncoderModel`
directories, save ours in the same layout (sharded safetensors, written atomically, with `checkpoint.py`'s
readers and writers), and tell such a directory from a decoder's (`is_seq2seq`).

Our parameter names are the checkpoint's. transformers writes the tied embeddings once, as `shared.weight`
(older versions also as `encoder.embed_tokens.weight` and `decoder.embed_tokens.weight`, which are read past),
and never a tied head."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.checkpoint import atomic_dir, check_state, read_tensors, resolve_dtype, write_weights
from lmforge.families import SEQ2SEQ_SPELLINGS, is_seq2seq_config, seq2seq_family_of
from lmforge.hub import resolve_checkpoint
from lmforge.io import read_json
from lmforge.seq2seq import Seq2SeqConfig, Seq2SeqEncoder, Seq2SeqLM

# On-disk tensors that are copies of `shared.weight`, or (the decoder's cross-attention never has one) unused.
IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def is_seq2seq(path: str | Path) -> bool:
    """Whether a model directory (or Hub id) holds an encoder-decoder model (or its encoder alone), by its
    config.json's `architectures` (else `model_type`): load it with `load_seq2seq`, else with
    `checkpoint.load_model`."""
    file = resolve_checkpoint(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json; is {path} a model directory?")
    return is_seq2seq_config(read_json(file))


def is_encoder_only(hf: dict[str, Any], source: str) -> bool:
    """Whether a config.json dict names the family's encoder-only architecture (`T5EncoderModel`)."""
    spelling = SEQ2SEQ_SPELLINGS[seq2seq_family_of(hf, source)]
    return spelling.encoder_architecture in (hf.get("architectures") or [])


def load_seq2seq(path: str | Path, *, encoder_only: bool | None = None, dtype: torch.dtype | str | None = None,
                 device: torch.device | str = "cpu") -> Seq2SeqEncoder:
    """Load an HF encoder-decoder directory (or Hub id) in eval mode: a `Seq2SeqLM`, or a `Seq2SeqEncoder` when
    `encoder_only` (default: when config.json names the encoder-only architecture; a whole model's
    directory loads as its encoder too). `dtype` defaults to the config's."""
    path = resolve_checkpoint(path)
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json; is {path} a model directory?")
    hf = read_json(file)
    config = Seq2SeqConfig.from_hf(hf, source=str(file))
    if encoder_only is None:
        encoder_only = is_encoder_only(hf, str(file))
    elif not encoder_only and is_encoder_only(hf, str(file)):
        raise ValueError(f"{file}: architectures names an encoder alone; it has no decoder to load")
    state = {k: v for k, v in read_tensors(path).items() if k not in IGNORED}
    if encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith(("decoder.", "lm_head."))}
    dtype = resolve_dtype(dtype or config.torch_dtype)
    with torch.device("meta"):
        model = Seq2SeqEncoder(config) if encoder_only else Seq2SeqLM(config)
    expected = model.state_dict()
    if config.tie_word_embeddings or encoder_only:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    check_state(path, state, expected)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True)
    if isinstance(model, Seq2SeqLM) and config.tie_word_embeddings:
        model.lm_head.weight = model.shared.weight
    model.config.torch_dtype = str(dtype).removeprefix("torch.")
    return model.eval()


def generation_config(config: Seq2SeqConfig) -> dict[str, Any]:
    """transformers' `generation_config.json` of an encoder-decoder model."""
    eos = config.eos_token_ids
    return {"decoder_start_token_id": config.decoder_start_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos or None, "pad_token_id": config.pad_token_id}


def save_seq2seq(model: Seq2SeqEncoder, out: str | Path, *, tokenizer: Any = None,
                 max_shard_size: int | str = "5GB", state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write `model` (a `Seq2SeqLM`, or a `Seq2SeqEncoder` as `T5EncoderModel`) as an HF model directory,
    atomically, with the tokenizer if given. `state_dict` replaces the model's own."""
    state = {k: v.detach().cpu() for k, v in (state_dict or model.state_dict()).items()}
    dtype = state["shared.weight"].dtype
    config = model.config.model_copy(update={"torch_dtype": str(dtype).removeprefix("torch.")})
    encoder_only = not isinstance(model, Seq2SeqLM)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_dir(out) as tmp:
        write_weights(tmp, state, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config.to_hf(encoder_only=encoder_only), indent=2) + "\n")
        if not encoder_only:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)
