"""What every GGUF export shares: the f32/f16 choice, the atomic write, and the special-token keys.

`lmforge.export.gguf` (decoder-only architectures) and `lmforge.export.gguf_t5` (T5's encoder-decoder)
both end here: metadata first, then tensors in their order, into a temporary file beside `out` that
replaces it only once complete. Matrices take the chosen dtype; every 1-D tensor, the norms and the
MoE router stay f32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import Tensor

from lmforge.tokenizer import Tokenizer

DTYPES = {"f32": (torch.float32, gguf.LlamaFileType.ALL_F32), "f16": (torch.float16, gguf.LlamaFileType.MOSTLY_F16)}
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight")  # besides every 1-D tensor


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unsupported GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def write_gguf(out: Path, arch: str, name: str, tensors: dict[str, Tensor], dtype: str,
               add_metadata: Callable[[gguf.GGUFWriter], None]) -> Path:
    """Write GGUF file `out` (atomically) for llama.cpp architecture `arch`: general keys, whatever
    `add_metadata` adds, then `tensors` (llama.cpp's names, in order) in `dtype` where not kept f32."""
    check_dtype(dtype)
    torch_dtype, file_type = DTYPES[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        add_metadata(writer)
        for target, tensor in tensors.items():
            keep_f32 = tensor.dim() == 1 or target.endswith(KEEP_F32)
            writer.add_tensor(target, tensor.to(torch.float32 if keep_f32 else torch_dtype).numpy())
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def add_special_tokens(writer: gguf.GGUFWriter, tokenizer: Tokenizer, ids: dict[str, int | None]) -> None:
    """The bos/eos/pad/unk ids in `ids` (None: not written), and whether encoding adds BOS and EOS:
    tokenizer_config.json's `add_bos_token`/`add_eos_token`, else what the post-processor does."""
    for kind, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    added = tokenizer.backend.encode("a", add_special_tokens=True).ids
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    bos, eos = ids.get("bos"), ids.get("eos")
    adds_bos = bos is not None and added[:1] == [bos] and plain[:1] != [bos]
    adds_eos = eos is not None and added[-1:] == [eos] and plain[-1:] != [eos]
    writer.add_add_bos_token(bool(tokenizer.config.get("add_bos_token", adds_bos)))
    writer.add_add_eos_token(bool(tokenizer.config.get("add_eos_token", adds_eos)))
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def flatten_steps(step: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A tokenizer.json normalizer or pre-tokenizer as a list of steps (Sequences unrolled)."""
    if not step:
        return []
    if step.get("type") == "Sequence":
        return [s for inner in step.get("normalizers", step.get("pretokenizers", [])) for s in flatten_steps(inner)]
    return [step]
