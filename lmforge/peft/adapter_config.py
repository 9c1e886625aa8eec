"""The method part of PEFT's `adapter_config.json` for LoRA/DoRA and (IA)³: written from a model's
adapter layers, and read back into the shapes of the tensors an adapter must hold and the layers
to add. Module names here are ours; `adapters.py` renames them to a family's on-disk names."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.peft.ia3 import add_ia3, check_feedforward, ia3_layers, is_feedforward
from lmforge.peft.lora import add_lora, linear_names, lora_layers, matches, pattern_value, target_names
from lmforge.peft.saved_modules import add_modules_to_save, expected_saved_state, saved_modules, suffix_match
from lmforge.peft.tokens import add_trainable_tokens, expected_token_state, peft_token_indices

Rename = Callable[[list[str]], list[str]]  # our module names -> the family's on-disk names
Plan = tuple[dict[str, tuple[int, ...]], Callable[[nn.Module], None]]  # expected tensor shapes, how to add them

LORA_UNSUPPORTED = ("fan_in_fan_out", "layers_to_transform", "lora_bias", "target_parameters", "layer_replication",
                    "use_qalora", "use_bdlora", "alora_invocation_tokens")
IA3_UNSUPPORTED = ("fan_in_fan_out", "exclude_modules")


def module_list(chosen: Sequence[str], candidates: Sequence[str], rename: Rename,
                match: Callable[[str, Sequence[str]], bool] = matches) -> list[str]:
    """`chosen` as PEFT's list, in on-disk names: their last names where those select exactly `chosen`
    among `candidates`, else their full names."""
    chosen, candidates = rename(list(chosen)), rename(list(candidates))
    leaves = sorted({name.rsplit(".", 1)[-1] for name in chosen})
    if {n for n in candidates if match(n, leaves)} == set(chosen):
        return leaves
    return sorted(chosen)


def _patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value and PEFT's pattern for the rest (`values` by on-disk name): by last name
    where all modules of that name share the value, else by escaped full name."""
    default = Counter(values.values()).most_common(1)[0][0]
    by_leaf: dict[str, set[Any]] = {}
    for name, value in values.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(value)
    pattern: dict[str, Any] = {}
    for name, value in values.items():
        leaf = name.rsplit(".", 1)[-1]
        if len(by_leaf[leaf]) == 1:
            if value != default:
                pattern[leaf] = value
        elif value != default:
            pattern[re.escape(name)] = value
    return default, dict(sorted(pattern.items()))


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def saved_list(model: nn.Module, rename: Rename) -> list[str] | None:
    """PEFT's `modules_to_save` for the model's saved modules, or None."""
    chosen = [name for name, _ in saved_modules(model)]
    if not chosen:
        return None
    inner = tuple(f"{c}." for c in chosen)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inner)]
    return module_list(chosen, candidates, rename, suffix_match)


def lora_config(model: nn.Module, rename: Rename, fused: dict[str, tuple[int, Any]] | None = None) -> dict[str, Any]:
    """LoraConfig fields for the model's LoRA/DoRA layers (per-module r/alpha as patterns); `fused`
    gives (r, alpha) by on-disk name where a fused module's joined adapter has its own."""
    layers = dict(lora_layers(model))
    settings = {(m.dropout, m.rslora, m.dora) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers differ in (dropout, rslora, dora): {sorted(settings)}; PEFT's format holds one")
    dropout, rslora, dora = settings.pop()
    values = {rename([n])[0]: (m.r, _number(m.alpha)) for n, m in layers.items()} | (fused or {})
    r, rank_pattern = _patterns({n: v[0] for n, v in values.items()})
    alpha, alpha_pattern = _patterns({n: v[1] for n, v in values.items()})
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": module_list(list(layers), linear_names(model), rename), "use_rslora": rslora,
        "fan_in_fan_out": False, "bias": "none", "use_dora": dora, "init_lora_weights": True,
        "modules_to_save": saved_list(model, rename), "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "trainable_token_indices": peft_token_indices(model),
    }


def ia3_config(model: nn.Module, rename: Rename) -> dict[str, Any]:
    """IA3Config fields for the model's (IA)³ layers."""
    layers = dict(ia3_layers(model))
    feedforward = [n for n, m in layers.items() if m.feedforward]
    targets = module_list(list(layers), linear_names(model), rename)
    ff = module_list(feedforward, list(layers), rename, suffix_match) if feedforward else []
    if not set(ff) <= set(targets):  # PEFT requires the subset: write both in full
        targets, ff = sorted(set(rename(list(layers)))), sorted(set(rename(feedforward)))
    return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ff, "fan_in_fan_out": False,
            "init_ia3_weights": True, "modules_to_save": saved_list(model, rename), "exclude_modules": None}


def _check_options(config: dict[str, Any], unsupported: Sequence[str], source: Path) -> None:
    for key in unsupported:
        if config.get(key):
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{source}: bias={config['bias']!r} is not supported (none)")


def _saved_plan(model: nn.Module, config: dict[str, Any], source: Path) -> dict[str, tuple[int, ...]]:
    names = config.get("modules_to_save") or []
    try:
        return expected_saved_state(model, names) if names else {}
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def lora_plan(model: nn.Module, config: dict[str, Any], source: Path) -> Plan:
    """The tensors a LoRA adapter with `config` holds for `model` (our names, shapes), and how to add its layers."""
    _check_options(config, LORA_UNSUPPORTED, source)
    r, alpha = config["r"], config["lora_alpha"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    dora, tokens = bool(config.get("use_dora")), config.get("trainable_token_indices")
    expected: dict[str, tuple[int, ...]] = {}
    for name in target_names(model, config["target_modules"]):
        layer, rank = model.get_submodule(name), pattern_value(ranks, name, r)
        expected[f"{name}.lora_A.weight"] = (rank, layer.in_features)
        expected[f"{name}.lora_B.weight"] = (layer.out_features, rank)
        if dora:
            expected[f"{name}.lora_magnitude_vector"] = (layer.out_features,)
    if tokens:
        try:
            expected |= expected_token_state(model, tokens)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    expected |= _saved_plan(model, config, source)

    def apply(model: nn.Module) -> None:
        add_lora(model, r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0), targets=config["target_modules"],
                 rslora=config.get("use_rslora", False), dora=dora, rank_pattern=ranks, alpha_pattern=alphas)
        if tokens:
            add_trainable_tokens(model, tokens)
        if config.get("modules_to_save"):
            add_modules_to_save(model, config["modules_to_save"])

    return expected, apply


def ia3_plan(model: nn.Module, config: dict[str, Any], source: Path) -> Plan:
    """The tensors an (IA)³ adapter with `config` holds for `model`, and how to add its layers."""
    _check_options(config, IA3_UNSUPPORTED, source)
    targets, feedforward = config.get("target_modules"), config.get("feedforward_modules") or []
    if not targets:
        raise ValueError(f"{source}: target_modules is not set")
    try:
        check_feedforward(targets, feedforward)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    expected: dict[str, tuple[int, ...]] = {}
    for name in target_names(model, targets):
        layer = model.get_submodule(name)
        ff = is_feedforward(name, feedforward)
        expected[f"{name}.ia3_l"] = (1, layer.in_features) if ff else (layer.out_features, 1)
    expected |= _saved_plan(model, config, source)

    def apply(model: nn.Module) -> None:
        add_ia3(model, targets=targets, feedforward=feedforward)
        if config.get("modules_to_save"):
            add_modules_to_save(model, config["modules_to_save"])

    return expected, apply
