"""Adapter directories in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `...ia3_l`,
`...lora_magnitude_vector`, a saved module's own `lm_head.weight`, or `prompt_embeddings`), so
`peft.PeftModel.from_pretrained(transformers_model, dir)` loads what lmforge saves and lmforge
loads what PEFT saves: LoRA (with DoRA, rank/alpha patterns, modules_to_save, trainable tokens),
(IA)³ and prompt tuning, of a causal LM (`task_type` CAUSAL_LM) or an encoder-decoder (SEQ_2_SEQ_LM, T5's
module names after the prefix: `base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight`).
`base_model_name_or_path` names the base model directory (absolute, or
relative to the adapter directory) or its Hub id (with PEFT's `revision`); adapter directories
themselves may be Hub ids too (`lmforge.hub`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.checkpoint import atomic_dir, load_model, module_on_disk, modules_in_ours, save_model, to_disk, to_ours
from lmforge.config import ModelConfig
from lmforge.hub import hub_id, parse_hub_id, resolve_checkpoint
from lmforge.io import read_json
from lmforge.peft.adapter_config import ia3_config, ia3_plan, lora_config, lora_plan
from lmforge.peft.fused import ADAPTER_SUFFIXES, is_shared, join_ia3, join_lora, split_joined
from lmforge.peft.ia3 import ia3_layers, is_feedforward
from lmforge.peft.lora import linear_names, lora_layers, matches, merge_and_unload, pattern_value
from lmforge.peft.prompt_tuning import PEFT_INIT, PromptTuned, Seq2SeqPromptTuned
from lmforge.peft.saved_modules import COPY, saved_modules, saved_state, suffix_match
from lmforge.peft.tokens import token_layers, token_state
from lmforge.seq2seq import Seq2SeqLM
from lmforge.seq2seq_checkpoint import is_seq2seq, load_seq2seq, save_seq2seq

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING")
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_2_SEQ_LM")  # None: peft's default, applied to the model it is given
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")


# ---- names: the one place where our names and PEFT's on-disk names meet --------------------------
# A family whose on-disk modules are fused (Phi-3's qkv_proj, Falcon/BLOOM's query_key_value) has its
# adapter tensors split/joined here, as `to_disk`/`to_ours` do for the weights (`fused.py` says how).


def _check_family(config: ModelConfig) -> None:
    if config.family == "gpt2":
        raise ValueError("PEFT adapters for GPT-2 are not supported: its q/k/v projections are one fused, "
                         "transposed Conv1D (c_attn) on disk; merge the adapter into the model instead")


def _adapter_key(key: str) -> tuple[str, str] | None:
    """(module, suffix) of an adapter layer's tensor name, or None for other tensors."""
    suffix = next((s for s in ADAPTER_SUFFIXES if key.endswith(s)), None)
    return None if suffix is None else (key[: -len(suffix)], suffix)


def to_peft_keys(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our adapter tensor names -> PEFT's keys (a saved module's copy under the module's own names).
    A fused module's parts must be in joined form (`fused.join_lora`): all present, shared tensors equal."""
    _check_family(config)
    plain, shared = {}, {}
    for key, tensor in state.items():
        split = _adapter_key(key)
        if split and is_shared(split[1], tensor) and len(_parts(split[0], config)) > 1:
            shared.setdefault(module_on_disk(config.family, split[0], config) + split[1], tensor)
        else:
            plain[key.replace(f".{COPY}.", ".")] = tensor
    return {PREFIX + k: v for k, v in (to_disk(config.family, plain, config) | shared).items()}


def _parts(module: str, config: ModelConfig) -> tuple[str, ...]:
    return modules_in_ours(config.family, module_on_disk(config.family, module, config), config)


def from_peft_keys(tensors: dict[str, Tensor], config: ModelConfig, source: Path,
                   saved: Sequence[str] = ()) -> dict[str, Tensor]:
    """PEFT's keys -> our names; tensors of the modules `saved` (our names) go to their trained copies.
    A fused module's tensors give each part its rows, or a copy of a shared one (joined form)."""
    _check_family(config)
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(f"{source}: key {foreign[0]!r} does not start with {PREFIX!r}; not a PEFT adapter "
                         "of a language model")
    disk, state = {}, {}
    for key, tensor in ((k[len(PREFIX):], v) for k, v in tensors.items()):
        split = _adapter_key(key)
        parts = modules_in_ours(config.family, split[0], config) if split else ()
        if len(parts) > 1 and is_shared(split[1], tensor):
            state |= {part + split[1]: tensor for part in parts}
        else:
            disk[key] = tensor
    state |= to_ours(config.family, disk, config)
    ours = {}
    for key, tensor in state.items():
        module = next((m for m in saved if key.startswith(m + ".")), None)
        ours[key if module is None else f"{module}.{COPY}.{key[len(module) + 1:]}"] = tensor
    return ours


def peft_module_names(names: list[str], config: ModelConfig) -> list[str]:
    """Our module names as the family spells them on disk (for target_modules and patterns); the parts
    of a fused module give its one name."""
    return list(dict.fromkeys(module_on_disk(config.family, n, config) for n in names))


def config_to_ours(config: dict[str, Any], model: nn.Module, source: Path) -> dict[str, Any]:
    """An adapter config whose module names (target_modules, feedforward_modules, rank/alpha patterns,
    modules_to_save) are the family's on-disk ones, with our full module names instead (each part of a
    fused module)."""
    on_disk: dict[str, list[str]] = {}
    for name in linear_names(model):
        on_disk.setdefault(module_on_disk(model.config.family, name, model.config), []).append(name)
    targets = config.get("target_modules")
    if all([disk] == ours for disk, ours in on_disk.items()) or not targets:
        return config
    missing = [] if isinstance(targets, str) else [t for t in targets if not any(matches(d, [t]) for d in on_disk)]
    chosen = [d for d in on_disk if matches(d, targets)]
    if missing or not chosen:
        leaves = sorted({d.rsplit(".", 1)[-1] for d in on_disk})
        raise ValueError(f"{source}: target module(s) {', '.join(missing) or repr(targets)} not found; the model's "
                         f"linear layers are named {', '.join(leaves)}")
    ours = dict(config, target_modules=targets if targets == "all-linear" else [p for d in chosen for p in on_disk[d]])
    if config.get("feedforward_modules"):
        ours["feedforward_modules"] = [p for d in chosen if is_feedforward(d, config["feedforward_modules"])
                                       for p in on_disk[d]]
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            values = {d: pattern_value(config[key], d, None) for d in chosen}
            ours[key] = {re.escape(p): v for d, v in values.items() if v is not None for p in on_disk[d]}
    if config.get("modules_to_save"):  # PEFT's suffix rule on the on-disk names (none matched: the plan reports)
        modules = {module_on_disk(model.config.family, n, model.config): n for n, _ in model.named_modules() if n}
        saved = [n for d, n in modules.items() if suffix_match(d, config["modules_to_save"])]
        ours["modules_to_save"] = saved or config["modules_to_save"]
    return ours


# ---- saving ------------------------------------------------------------------------------------


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under our names: LoRA A/B matrices (and DoRA magnitudes), (IA)³ vectors,
    trainable token rows and saved modules' copies, or the soft prompt."""
    if isinstance(model, (PromptTuned, Seq2SeqPromptTuned)):
        return {"prompt_embeddings": model.prompt_embeddings}
    state = {}
    for name, m in lora_layers(model):
        state[f"{name}.lora_A.weight"] = m.lora_A.weight
        state[f"{name}.lora_B.weight"] = m.lora_B.weight
        if m.dora:
            state[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    for name, m in ia3_layers(model):
        state[f"{name}.ia3_l"] = m.ia3_l
    return state | token_state(model) | saved_state(model)


def _method_config(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The method's config fields and `state` with fused modules' parts joined (`fused.py`)."""
    rename = lambda names: peft_module_names(names, model.config)  # noqa: E731
    if any(ia3_layers(model)):
        if any(lora_layers(model)) or any(token_layers(model)):
            raise ValueError("the model has (IA)³ and LoRA layers or trainable tokens; PEFT's format holds one method")
        return ia3_config(model, rename), join_ia3(model, state)
    if not any(lora_layers(model)) and any(saved_modules(model)):
        raise ValueError("modules_to_save go with a LoRA or (IA)³ adapter; the model has neither")
    state, fused = join_lora(model, state)
    return lora_config(model, rename, fused), state


def task_type(model: nn.Module) -> str:
    """PEFT's task type of a model: SEQ_2_SEQ_LM for an encoder-decoder, else CAUSAL_LM."""
    return "SEQ_2_SEQ_LM" if isinstance(model, Seq2SeqLM) else "CAUSAL_LM"


def _prompt_config(model: PromptTuned | Seq2SeqPromptTuned, base: str) -> dict[str, Any]:
    text = model.init == "text"
    return {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": model.config.hidden_size, "num_transformer_submodules": getattr(model, "submodules", 1),
        "num_attention_heads": model.config.num_attention_heads, "num_layers": model.config.num_hidden_layers,
        "prompt_tuning_init": PEFT_INIT[model.init], "prompt_tuning_init_text": model.init_text if text else None,
        "tokenizer_name_or_path": base if text else None, "tokenizer_kwargs": None, "modules_to_save": None,
    }


def save_adapter(model: nn.Module, out: str | Path, *, base: str | Path) -> Path:
    """Write `model`'s adapter (LoRA layers or soft prompt) to `out` in PEFT's format, atomically.
    `base` is the base model's directory (written absolute) or Hub id (`org/name[@revision]`)."""
    state = adapter_state(model)
    if not state:
        raise ValueError("the model has no adapter to save (no LoRA or (IA)³ layers, no soft prompt)")
    base, revision = hub_id(base) or (str(Path(base).resolve()) if Path(base).is_dir() else str(base), None)
    if isinstance(model, (PromptTuned, Seq2SeqPromptTuned)):
        method = _prompt_config(model, base)
    else:
        method, state = _method_config(model, state)
        state = to_peft_keys(state, model.config)
    config = {"task_type": task_type(model), "base_model_name_or_path": base, "revision": revision,
              "inference_mode": True, "auto_mapping": None, **method}
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
    if kind not in PEFT_TYPES:
        raise ValueError(f"{path / CONFIG}: peft_type {kind!r} is not supported ({', '.join(PEFT_TYPES)})")
    if config.get("task_type") not in TASK_TYPES:
        raise ValueError(f"{path / CONFIG}: task_type {config['task_type']!r} is not supported "
                         "(CAUSAL_LM, SEQ_2_SEQ_LM or null)")
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
    """Apply the adapter saved in `path` to `model`: LoRA/DoRA or (IA)³ in place (returns `model`),
    or a soft prompt (returns a `PromptTuned` around `model`). A model that already has the
    adapter's layers or soft prompt (e.g. when resuming training) gets the saved values loaded into them."""
    path = Path(path)
    config, tensors = read_adapter(path)
    if config.get("task_type") not in (None, task_type(model)):
        raise ValueError(f"{path / CONFIG}: task_type {config['task_type']!r} does not fit the model, a "
                         f"{task_type(model)} ({type(model).__name__})")
    if config["peft_type"] == "PROMPT_TUNING":
        return _load_prompt(model, config, tensors, path)
    adapted = any(lora_layers(model)) or any(ia3_layers(model)) or any(token_layers(model))
    if adapted:
        expected = {name: tuple(t.shape) for name, t in adapter_state(model).items()}
        apply = None
    else:
        plan = lora_plan if config["peft_type"] == "LORA" else ia3_plan
        expected, apply = plan(model, config_to_ours(config, model, path / CONFIG), path / CONFIG)
    saved = sorted({k.split(f".{COPY}.")[0] for k in expected if f".{COPY}." in k})
    state = from_peft_keys(tensors, model.config, path / WEIGHTS, saved)
    if adapted:
        state = split_joined(model, state)
    _check_keys(state, expected, path / WEIGHTS)
    if apply is not None:
        apply(model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in state.items():
            tensors[name].copy_(tensor)
    return model


def _check_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: Path) -> None:
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected:
        raise ValueError(f"{source}: adapter tensor {unexpected[0]!r} matches no adapter layer of the model"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    if missing:
        raise ValueError(f"{source}: no tensor for {missing[0]!r}, a layer the adapter config targets"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model expects {shape}")


def _load_prompt(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor],
                 path: Path) -> PromptTuned | Seq2SeqPromptTuned:
    if set(tensors) != {"prompt_embeddings"}:
        found = ", ".join(sorted(tensors))
        raise ValueError(f"{path / WEIGHTS}: expected one tensor 'prompt_embeddings', found {found}")
    prompt = tensors["prompt_embeddings"]
    seq2seq = isinstance(model, Seq2SeqLM)
    # peft's default for a SEQ_2_SEQ_LM is 2 submodules (the encoder's rows, then unused decoder rows)
    submodules = config.get("num_transformer_submodules") or (2 if seq2seq else 1)
    n = config["num_virtual_tokens"] * submodules
    if submodules != 1 and not seq2seq:
        raise ValueError(f"{path / CONFIG}: num_transformer_submodules {submodules} is for an encoder-decoder; "
                         "a causal LM has 1")
    prompted = isinstance(model, (PromptTuned, Seq2SeqPromptTuned))
    if prompted and model.prompt_embeddings.shape[0] != n:
        raise ValueError(f"{path}: the adapter has {n} virtual tokens, the model {model.prompt_embeddings.shape[0]}")
    if tuple(prompt.shape) != (n, model.config.hidden_size):
        raise ValueError(f"{path / WEIGHTS}: prompt_embeddings has shape {tuple(prompt.shape)}, expected "
                         f"({n}, {model.config.hidden_size}) for this config and model")
    if prompted:
        with torch.no_grad():
            model.prompt_embeddings.copy_(prompt)
        return model
    init = {v: k for k, v in PEFT_INIT.items()}.get(config.get("prompt_tuning_init"), "random")
    model.requires_grad_(False)
    text = config.get("prompt_tuning_init_text")
    prompt = prompt.to(model.lm_head.weight.device)
    if seq2seq:
        tuned = Seq2SeqPromptTuned(model, prompt, submodules=submodules, init=init, init_text=text)
    else:
        tuned = PromptTuned(model, prompt, init=init, init_text=text)
    return tuned.train(model.training)


def load_with_adapter(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
    merge: bool = False,
) -> nn.Module:
    """Load the base model an adapter directory names (a `Transformer`, or a `Seq2SeqLM` where its config.json
    names an encoder-decoder), then the adapter. `merge` folds LoRA/DoRA/(IA)³ (and saved modules) into the
    weights and returns the plain model; a soft prompt stays a `PromptTuned`/`Seq2SeqPromptTuned` wrapper."""
    base = adapter_base(path)
    load = load_seq2seq if is_seq2seq(base) else load_model
    adapted = load_adapter(load(base, dtype=dtype, device=device), path)
    prompted = isinstance(adapted, (PromptTuned, Seq2SeqPromptTuned))
    return merge_and_unload(adapted) if merge and not prompted else adapted


class TokenizerFiles:
    """The tokenizer files of a model directory, copied as they are (`save_model`'s tokenizer)."""

    def __init__(self, source: Path) -> None:
        self.files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]

    def save(self, out_dir: Path) -> None:
        for file in self.files:
            shutil.copy2(file, out_dir / file.name)


def merge_and_save(adapter_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | str | None = None) -> Path:
    """Write the base model with a LoRA/DoRA or (IA)³ adapter merged in, as an HF model directory
    (atomically), with the base's tokenizer files."""
    config, _ = read_adapter(adapter_dir)
    if config["peft_type"] == "PROMPT_TUNING":
        raise ValueError(f"{adapter_dir}: a {config['peft_type']} adapter has no weights to merge; "
                         "load it with load_with_adapter instead")
    base = adapter_base(adapter_dir)
    model = load_with_adapter(adapter_dir, dtype=dtype, merge=True)
    save = save_seq2seq if isinstance(model, Seq2SeqLM) else save_model
    return save(model, out_dir, tokenizer=TokenizerFiles(base))

