"""Hugging Face model directories: load any supported family, save our models in the same layout.

Llama, Mistral and Qwen2 weights use our parameter names as they are; Mixtral, GPT-2, Phi-3, Falcon
and BLOOM store theirs differently on disk, and one small declarative `KeyMap` per family converts them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.hub import resolve_checkpoint
from lmforge.model import Transformer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
M = TypeVar("M", bound=nn.Module)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class KeyMap:
    """How a family's on-disk names differ from ours.

    `renames`: (disk, ours) module-name templates, `{i}` standing for a number.
    `transposed`: our weight names that are stored transposed (GPT-2's Conv1D).
    `fused`: our virtual name -> the real names it splits into along dim 0, one block after another
    (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj).
    `grouped`: fused q/k/v names whose rows are interleaved per KV head instead: (kv_heads,
    q_heads / kv_heads + 2, head_dim), each group's query heads then its key and its value (Falcon,
    whose multi-query case is one group; BLOOM, whose [heads, 3, head_dim] is one group per head).
    `prefix`: added to every disk name but the head's; read with or without it.
    `ignored`: disk names (regex) that hold no weights of ours (e.g. old GPT-2 mask buffers)."""

    renames: tuple[tuple[str, str], ...] = ()
    transposed: tuple[str, ...] = ()
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    grouped: tuple[str, ...] = ()
    prefix: str = ""
    ignored: tuple[str, ...] = ()


# transformers < 4.31 saved every layer's rotary `inv_freq` buffer; it holds no weights (transformers skips it too).
OLD_ROPE_BUFFER = r"(^|\.)rotary_emb\.inv_freq$"
DEFAULT_KEY_MAP = KeyMap(ignored=(OLD_ROPE_BUFFER,))
KEY_MAPS: dict[str, KeyMap] = {
    "mixtral": KeyMap(
        renames=(
            ("model.layers.{i}.block_sparse_moe.gate", "model.layers.{i}.mlp.gate"),
            ("model.layers.{i}.block_sparse_moe.experts.{i}.w1", "model.layers.{i}.mlp.experts.{i}.gate_proj"),
            ("model.layers.{i}.block_sparse_moe.experts.{i}.w2", "model.layers.{i}.mlp.experts.{i}.down_proj"),
            ("model.layers.{i}.block_sparse_moe.experts.{i}.w3", "model.layers.{i}.mlp.experts.{i}.up_proj"),
        ),
        ignored=(OLD_ROPE_BUFFER,),
    ),
    "gpt2": KeyMap(
        renames=(
            ("wte", "model.embed_tokens"),
            ("wpe", "model.embed_positions"),
            ("ln_f", "model.norm"),
            ("h.{i}.ln_1", "model.layers.{i}.input_layernorm"),
            ("h.{i}.ln_2", "model.layers.{i}.post_attention_layernorm"),
            ("h.{i}.attn.c_attn", "model.layers.{i}.self_attn.qkv"),
            ("h.{i}.attn.c_proj", "model.layers.{i}.self_attn.o_proj"),
            ("h.{i}.mlp.c_fc", "model.layers.{i}.mlp.up_proj"),
            ("h.{i}.mlp.c_proj", "model.layers.{i}.mlp.down_proj"),
        ),
        transposed=("qkv.weight", "o_proj.weight", "up_proj.weight", "down_proj.weight"),
        fused=(("self_attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),),
        prefix="transformer.",
        ignored=(r"h\.\d+\.attn\.(bias|masked_bias)$",),
    ),
    "phi3": KeyMap(
        fused=(
            ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        ignored=(OLD_ROPE_BUFFER,),
    ),
}
_QKV = (("self_attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),)
_FALCON_BLOOM_LAYERS = (  # the block names Falcon and BLOOM share
    ("word_embeddings", "model.embed_tokens"),
    ("ln_f", "model.norm"),
    ("h.{i}.input_layernorm", "model.layers.{i}.input_layernorm"),
    ("h.{i}.post_attention_layernorm", "model.layers.{i}.post_attention_layernorm"),
    ("h.{i}.self_attention.query_key_value", "model.layers.{i}.self_attn.qkv"),
    ("h.{i}.self_attention.dense", "model.layers.{i}.self_attn.o_proj"),
    ("h.{i}.mlp.dense_h_to_4h", "model.layers.{i}.mlp.up_proj"),
    ("h.{i}.mlp.dense_4h_to_h", "model.layers.{i}.mlp.down_proj"),
)
# Falcon's parallel blocks with two norms name them ln_attn and ln_mlp; listed first, they are also the names written.
_FALCON_TWO_NORMS = (
    ("h.{i}.ln_attn", "model.layers.{i}.input_layernorm"),
    ("h.{i}.ln_mlp", "model.layers.{i}.post_attention_layernorm"),
)
KEY_MAPS["falcon"] = KeyMap(renames=_FALCON_BLOOM_LAYERS + _FALCON_TWO_NORMS, fused=_QKV,
                            grouped=("self_attn.qkv",), prefix="transformer.")
FALCON_TWO_NORMS = KeyMap(renames=_FALCON_TWO_NORMS + _FALCON_BLOOM_LAYERS, fused=_QKV,
                          grouped=("self_attn.qkv",), prefix="transformer.")
KEY_MAPS["bloom"] = KeyMap(
    renames=(("word_embeddings_layernorm", "model.embed_layernorm"),) + _FALCON_BLOOM_LAYERS, fused=_QKV,
    grouped=("self_attn.qkv",), prefix="transformer.",
)


def key_map(family: str, config: ModelConfig) -> KeyMap:
    """The on-disk mapping of `family` for `config` (Falcon spells a parallel block's two norms its own way)."""
    if family == "falcon" and config.parallel_residual and not config.shared_block_norm:
        return FALCON_TWO_NORMS
    return KEY_MAPS.get(family, DEFAULT_KEY_MAP)


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + r"(\..+)$")


def _fill(template: str, numbers: tuple[str, ...]) -> str:
    for n in numbers:
        template = template.replace("{i}", n, 1)
    return template


def _rename(name: str, renames: tuple[tuple[str, str], ...], reverse: bool) -> str:
    for disk, ours in renames:
        source, target = (ours, disk) if reverse else (disk, ours)
        match = _template_regex(source).match(name)
        if match:
            *numbers, rest = match.groups()
            return _fill(target, tuple(numbers)) + rest
    return name


def to_ours(family: str, disk: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename and reshape a family's on-disk tensors into our state-dict names."""
    keymap = key_map(family, config)
    ours: dict[str, Tensor] = {}
    for name, tensor in disk.items():
        if keymap.prefix and name.startswith(keymap.prefix):
            name = name[len(keymap.prefix) :]
        if any(re.search(pattern, name) for pattern in keymap.ignored):
            continue
        name = _rename(name, keymap.renames, reverse=False)
        if name.endswith(keymap.transposed):
            tensor = tensor.t()
        for virtual, parts in keymap.fused:
            if virtual + "." in name:
                if virtual in keymap.grouped:
                    pieces = _ungroup(tensor, config)
                else:
                    pieces = tensor.split([_rows(config, part) for part in parts], dim=0)
                for part, piece in zip(parts, pieces):
                    ours[name.replace(virtual, part)] = piece.contiguous()
                break
        else:
            ours[name] = tensor.contiguous()
    return ours


def to_disk(family: str, ours: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our state dict in the family's on-disk names and layout (inverse of `to_ours`)."""
    keymap = key_map(family, config)
    merged = dict(ours)
    for virtual, parts in keymap.fused:
        for name in [n for n in merged if parts[0] + "." in n]:
            group = [merged.pop(name.replace(parts[0], part)) for part in parts]
            fuse = _group if virtual in keymap.grouped else lambda pieces, _: torch.cat(pieces, dim=0)
            merged[name.replace(parts[0], virtual)] = fuse(group, config)
    disk: dict[str, Tensor] = {}
    for name, tensor in merged.items():
        if name.endswith(keymap.transposed):
            tensor = tensor.t()
        disk_name = _rename(name, keymap.renames, reverse=True)
        if keymap.prefix and not disk_name.startswith("lm_head."):
            disk_name = keymap.prefix + disk_name
        disk[disk_name] = tensor.contiguous()
    return disk


def module_on_disk(family: str, name: str, config: ModelConfig) -> str:
    """Our module `name` as the family names it on disk; a part of a fused module (q_proj) gives the fused one's."""
    keymap = key_map(family, config)
    for virtual, parts in keymap.fused:
        part = next((p for p in parts if name.endswith("." + p)), None)
        if part is not None:
            name = name[: -len(part)] + virtual
            break
    disk = _rename(name + ".w", keymap.renames, reverse=True)[:-2]
    return keymap.prefix + disk if keymap.prefix and disk != "lm_head" else disk


def modules_in_ours(family: str, disk: str, config: ModelConfig) -> tuple[str, ...]:
    """Our module names for the family's on-disk module `disk`: a fused module's parts, in order, else one name."""
    keymap = key_map(family, config)
    if keymap.prefix and disk.startswith(keymap.prefix):
        disk = disk[len(keymap.prefix) :]
    name = _rename(disk + ".w", keymap.renames, reverse=False)[:-2]
    for virtual, parts in keymap.fused:
        if name.endswith("." + virtual):
            return tuple(name[: -len(virtual)] + part for part in parts)
    return (name,)


def _rows(config: ModelConfig, part: str) -> int:
    """Rows of one piece of a fused weight, by our module name."""
    heads = config.num_attention_heads if part.endswith("q_proj") else config.num_key_value_heads
    return config.intermediate_size if part.endswith(("gate_proj", "up_proj")) else heads * config.head_dim


def _ungroup(fused: Tensor, config: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v from rows laid out (kv_heads, q_heads / kv_heads + 2, head_dim) (see `KeyMap.grouped`)."""
    kv, hd = config.num_key_value_heads, config.head_dim
    groups = fused.reshape(kv, -1, hd, *fused.shape[1:])
    q = groups[:, :-2].reshape(-1, *fused.shape[1:])
    return q, groups[:, -2].reshape(kv * hd, *fused.shape[1:]), groups[:, -1].reshape(kv * hd, *fused.shape[1:])


def _group(pieces: list[Tensor], config: ModelConfig) -> Tensor:
    """Inverse of `_ungroup`: each KV group's query heads, then its key, then its value."""
    kv, hd = config.num_key_value_heads, config.head_dim
    q, k, v = (p.reshape(kv, -1, hd, *p.shape[1:]) for p in pieces)
    return torch.cat((q, k, v), dim=1).reshape(-1, *q.shape[3:])


# ---- reading ---------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (one file or an index of shards)."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path / INDEX}: not a valid safetensors index ({e})") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / "pytorch_model.bin").exists():
        raise ValueError(f"{path}: only pytorch_model.bin found; lmforge loads weights from safetensors only")
    raise FileNotFoundError(f"{path}: no {WEIGHTS} or {INDEX}")


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a model directory, keyed by its on-disk name."""
    tensors: dict[str, Tensor] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: shard named in {INDEX} is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    return tensors


def load_model(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> Transformer:
    """Load an HF-format model directory (or Hub id, `lmforge.hub`) of a supported family. `dtype`
    defaults to the config's."""
    path = resolve_checkpoint(path)
    config = ModelConfig.from_dir(path)
    state = to_ours(config.family, read_tensors(path), config)
    return instantiate(path, Transformer, config, state, dtype=dtype, device=device)


def instantiate(path: Path, make: Callable[[ModelConfig], M], config: ModelConfig, state: dict[str, Tensor], *,
                dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu") -> M:
    """`make(config)` (a module with a decoder trunk `model`) holding `state` (our names, read from
    `path`), in `dtype` (default: the config's) on `device`, in eval mode; a state that does not
    match the module is an error naming `path`."""
    dtype = resolve_dtype(dtype or config.torch_dtype)
    with torch.device("meta"):
        model = make(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    check_state(path, state, expected)
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True
    )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.reset_buffers(device)
    model.config.torch_dtype = str(dtype).removeprefix("torch.")
    return model.eval()


def check_state(path: Path, state: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Raise, naming `path`, unless `state` has exactly the tensors of `expected`, in its shapes, floating-point."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    for name in sorted(set(state) & set(expected)):
        got, want = state[name], expected[name]
        if got.shape != want.shape:
            problems.append(f"{name}: shape {tuple(got.shape)} on disk, model expects {tuple(want.shape)}")
        elif not got.is_floating_point():
            problems.append(f"{name}: dtype {got.dtype} on disk, expected a floating-point tensor")
    if problems:
        raise ValueError(f"{path}: weights do not match config.json:\n  " + "\n  ".join(problems))


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name (`"bfloat16"`, `"torch.float32"`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- writing ---------------------------------------------------------------------------------


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename,
    on failure it is deleted and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_size(size: int | str) -> int:
    """`"5GB"`, `"500MB"`, or a number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", size.upper())
    if not match:
        raise ValueError(f"cannot read size {size!r} (e.g. 5GB, 500MB)")
    return int(float(match[1]) * {None: 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[match[2]])


def write_weights(out: Path, tensors: dict[str, Tensor], max_shard_size: int | str = "5GB") -> None:
    """Write `model.safetensors`, or numbered shards plus an index above `max_shard_size`."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / WEIGHTS, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def generation_config(config: ModelConfig) -> dict[str, Any]:
    eos = config.eos_token_ids
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": config.pad_token_id,
    }


def save_model(
    model: Transformer,
    out: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write `model` as an HF model directory (atomically), with the tokenizer if given.
    `state_dict` replaces the model's own (e.g. one gathered from sharded processes)."""
    state = {k: v.detach().cpu() for k, v in (state_dict or model.state_dict()).items()}
    dtype = next(iter(state.values())).dtype
    config = model.config.model_copy(update={"torch_dtype": str(dtype).removeprefix("torch.")})
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    with atomic_dir(out) as tmp:
        write_weights(tmp, to_disk(config.family, state, config), max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)
