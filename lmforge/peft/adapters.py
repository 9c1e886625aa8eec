"""Adapter directories in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, or
`prompt_embeddings`), so `peft.PeftModel.from_pretrained(transformers_model, dir)` loads what
lmforge saves and lmforge loads what PEFT saves. `base_model_name_or_path` names the base model
directory (absolute, or relative to the adapter directory) or its Hub id (with PEFT's `revision`);
adapter directories themselves may be Hub ids too (`lmforge.hub`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.checkpoint import atomic_dir, load_model, save_model, to_disk, to_ours
from lmforge.config import ModelConfig
from lmforge.hub import hub_id, parse_hub_id, resolve_checkpoint
from lmforge.io import read_json
from lmforge.peft.lora import add_lora, linear_names, lora_layers, matches, merge_and_unload, target_names
from lmforge.peft.prompt_tuning import PEFT_INIT, PromptTuned
from lmforge.peft.tokens import (
    add_trainable_tokens, expected_token_state, peft_token_indices, token_layers, token_state,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
LORA_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
                    "layers_to_transform", "lora_bias", "target_parameters", "layer_replication")


# ---- names -------------------------------------------------------------------------------------


def _check_family(config: ModelConfig) -> None:
    if config.family == "gpt2":
        raise ValueError("PEFT adapters for GPT-2 are not supported: its q/k/v projections are one fused, "
                         "transposed Conv1D (c_attn) on disk; merge the adapter into the model instead")


def to_peft_keys(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    _check_family(config)
    return {PREFIX + k: v for k, v in to_disk(config.family, state, config).items()}


def from_peft_keys(tensors: dict[str, Tensor], config: ModelConfig, source: Path) -> dict[str, Tensor]:
    _check_family(config)
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(f"{source}: key {foreign[0]!r} does not start with {PREFIX!r}; not a PEFT LoRA adapter "
                         "of a causal LM")
    return to_ours(config.family, {k[len(PREFIX):]: v for k, v in tensors.items()}, config)


# ---- saving ------------------------------------------------------------------------------------


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under our names: LoRA A/B matrices and trainable token rows, or the soft prompt."""
    if isinstance(model, PromptTuned):
        return {"prompt_embeddings": model.prompt_embeddings}
    state = {}
    for name, m in lora_layers(model):
        state[f"{name}.lora_A.weight"] = m.lora_A.weight
        state[f"{name}.lora_B.weight"] = m.lora_B.weight
    return state | token_state(model)


def _lora_config(model: nn.Module) -> dict[str, Any]:
    layers = dict(lora_layers(model))
    settings = {(m.r, m.alpha, m.dropout, m.rslora) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers differ in (r, alpha, dropout, rslora): {sorted(settings)}; "
                         "PEFT's format holds one setting")
    r, alpha, dropout, rslora = settings.pop()
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
    if set(layers) != {n for n in linear_names(model) if matches(n, leaves)}:  # only some layers of a kind
        renamed = to_disk(model.config.family, {f"{n}.weight": torch.empty(0) for n in layers}, model.config)
        leaves = sorted(k.removesuffix(".weight") for k in renamed)
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout, "target_modules": leaves, "use_rslora": rslora, "fan_in_fan_out": False,
        "bias": "none", "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "trainable_token_indices": peft_token_indices(model),
    }


def _prompt_config(model: PromptTuned, base: str) -> dict[str, Any]:
    text = model.init == "text"
    return {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": model.config.hidden_size, "num_transformer_submodules": 1,
        "num_attention_heads": model.config.num_attention_heads, "num_layers": model.config.num_hidden_layers,
        "prompt_tuning_init": PEFT_INIT[model.init], "prompt_tuning_init_text": model.init_text if text else None,
        "tokenizer_name_or_path": base if text else None, "tokenizer_kwargs": None, "modules_to_save": None,
    }


def save_adapter(model: nn.Module, out: str | Path, *, base: str | Path) -> Path:
    """Write `model`'s adapter (LoRA layers or soft prompt) to `out` in PEFT's format, atomically.
    `base` is the base model's directory (written absolute) or Hub id (`org/name[@revision]`)."""
    state = adapter_state(model)
    if not state:
        raise ValueError("the model has no adapter to save (no LoRA layers, no soft prompt)")
    base, revision = hub_id(base) or (str(Path(base).resolve()) if Path(base).is_dir() else str(base), None)
    method = _prompt_config(model, base) if isinstance(model, PromptTuned) else _lora_config(model)
    config = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": revision, "inference_mode": True,
              "auto_mapping": None, **method}
    if not isinstance(model, PromptTuned):
        state = to_peft_keys(state, model.config)
    with atomic_dir(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    return Path(out)


# ---- loading -----------------------------------------------------------------------------------


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` (a directory or Hub id) holds a PEFT adapter."""
    return (resolve_checkpoint(path) / CONFIG).is_file()


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`adapter_config.json` and the tensors of an adapter directory (or Hub id), checked for PEFT's types."""
    path = resolve_checkpoint(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG}; is it an adapter directory?")
    config = read_json(path / CONFIG)
    kind = config.get("peft_type")
    if kind not in ("LORA", "PROMPT_TUNING"):
        raise ValueError(f"{path / CONFIG}: peft_type {kind!r} is not supported (LORA, PROMPT_TUNING)")
    if config.get("task_type") not in (None, "CAUSAL_LM"):  # None: peft's default, applied to a causal LM here
        raise ValueError(f"{path / CONFIG}: task_type {config['task_type']!r} is not supported (CAUSAL_LM or null)")
    if not (path / WEIGHTS).is_file():
        hint = " (only adapter_model.bin: lmforge reads safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path}: no {WEIGHTS}{hint}")
    try:
        tensors = load_file(path / WEIGHTS)
    except SafetensorError as e:
        raise ValueError(f"{path / WEIGHTS}: corrupt or truncated safetensors file ({e})") from None
    return config, tensors


def adapter_base(path: str | Path) -> Path:
    """The base model directory an adapter names: relative names resolve against the adapter directory,
    Hub ids (at the config's `revision`) to their snapshot in the Hub cache."""
    path = resolve_checkpoint(path)
    config, _ = read_adapter(path)
    name = config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{path / CONFIG}: base_model_name_or_path is not set; load the base and call load_adapter")
    base = path / name  # an absolute name replaces the adapter directory
    if not base.exists() and parse_hub_id(name) is not None:
        base = resolve_checkpoint(name, revision=config.get("revision"))
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{path / CONFIG}: base model {name!r} not found (looked for {base / 'config.json'})")
    return base


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the adapter saved in `path` to `model`: LoRA in place (returns `model`), or a soft
    prompt (returns a `PromptTuned` around `model`). A model that already has the adapter's
    layers or soft prompt (e.g. when resuming training) gets the saved values loaded into them."""
    path = Path(path)
    config, tensors = read_adapter(path)
    if config["peft_type"] == "PROMPT_TUNING":
        return _load_prompt(model, config, tensors, path)
    return _load_lora(model, config, tensors, path)


def _load_lora(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> nn.Module:
    for key in LORA_UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"{path / CONFIG}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path / CONFIG}: bias={config['bias']!r} is not supported (none)")
    r = config["r"]
    state = from_peft_keys(tensors, model.config, path / WEIGHTS)
    tokens = config.get("trainable_token_indices")
    adapted = any(lora_layers(model)) or any(token_layers(model))
    if adapted:
        expected = {name: tuple(t.shape) for name, t in adapter_state(model).items()}
    else:
        expected = {}
        for name in target_names(model, config["target_modules"]):
            layer = model.get_submodule(name)
            expected[f"{name}.lora_A.weight"] = (r, layer.in_features)
            expected[f"{name}.lora_B.weight"] = (layer.out_features, r)
        if tokens:
            try:
                expected |= expected_token_state(model, tokens)
            except ValueError as e:
                raise ValueError(f"{path / CONFIG}: {e}") from None
    _check_keys(state, expected, path / WEIGHTS)
    if not adapted:
        add_lora(model, r=r, alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                 targets=config["target_modules"], rslora=config.get("use_rslora", False))
        if tokens:
            add_trainable_tokens(model, tokens)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return model


def _check_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: Path) -> None:
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected:
        raise ValueError(f"{source}: adapter tensor {unexpected[0]!r} matches no LoRA layer of the model"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    if missing:
        raise ValueError(f"{source}: no tensor for {missing[0]!r}, a LoRA layer the adapter config targets"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model expects {shape}")


def _load_prompt(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> PromptTuned:
    if set(tensors) != {"prompt_embeddings"}:
        found = ", ".join(sorted(tensors))
        raise ValueError(f"{path / WEIGHTS}: expected one tensor 'prompt_embeddings', found {found}")
    prompt = tensors["prompt_embeddings"]
    n = config["num_virtual_tokens"] * (config.get("num_transformer_submodules") or 1)
    if isinstance(model, PromptTuned) and model.num_virtual_tokens != n:
        raise ValueError(f"{path}: the adapter has {n} virtual tokens, the model {model.num_virtual_tokens}")
    if tuple(prompt.shape) != (n, model.config.hidden_size):
        raise ValueError(f"{path / WEIGHTS}: prompt_embeddings has shape {tuple(prompt.shape)}, expected "
                         f"({n}, {model.config.hidden_size}) for this config and model")
    if isinstance(model, PromptTuned):
        with torch.no_grad():
            model.prompt_embeddings.copy_(prompt)
        return model
    init = {v: k for k, v in PEFT_INIT.items()}.get(config.get("prompt_tuning_init"), "random")
    model.requires_grad_(False)
    device = model.model.embed_tokens.weight.device
    prompted = PromptTuned(model, prompt.to(device), init=init, init_text=config.get("prompt_tuning_init_text"))
    return prompted.train(model.training)


def load_with_adapter(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
    merge: bool = False,
) -> nn.Module:
    """Load the base model an adapter directory names, then the adapter. `merge` folds LoRA into
    the weights and returns a plain `Transformer`; a soft prompt stays a `PromptTuned` wrapper."""
    model = load_model(adapter_base(path), dtype=dtype, device=device)
    adapted = load_adapter(model, path)
    return merge_and_unload(adapted) if merge and not isinstance(adapted, PromptTuned) else adapted


class TokenizerFiles:
    """The tokenizer files of a model directory, copied as they are (`save_model`'s tokenizer)."""

    def __init__(self, source: Path) -> None:
        self.files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]

    def save(self, out_dir: Path) -> None:
        for file in self.files:
            shutil.copy2(file, out_dir / file.name)


def merge_and_save(adapter_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | str | None = None) -> Path:
    """Write the base model with a LoRA adapter merged in, as an HF model directory (atomically),
    with the base's tokenizer files."""
    config, _ = read_adapter(adapter_dir)
    if config["peft_type"] != "LORA":
        raise ValueError(f"{adapter_dir}: a {config['peft_type']} adapter has no weights to merge; "
                         "load it with load_with_adapter instead")
    base = adapter_base(adapter_dir)
    model = load_with_adapter(adapter_dir, dtype=dtype, merge=True)
    return save_model(model, out_dir, tokenizer=TokenizerFiles(base))

