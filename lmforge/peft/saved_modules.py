"""PEFT's `modules_to_save`: whole modules (the output head, a norm) trained as full copies beside
an adapter.

`add_modules_to_save` wraps each module whose name ends with one of the given strings (PEFT's
rule: a plain suffix, so `norm` selects every `*layernorm` and `model.norm`) in a `SavedModule`:
`modules_to_save` is the trainable copy, `original_module` the frozen original that
`disable_adapters` switches back to. In PEFT's file the copy's tensors carry the module's own names
(`lm_head.weight`); in memory they sit under `lm_head.modules_to_save.weight`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

COPY = "modules_to_save"


class SavedModule(nn.Module):
    """A module trained as a full copy; the frozen original computes while `disabled`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = copy.deepcopy(module).requires_grad_(True)
        self.disabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.original_module if self.disabled else self.modules_to_save)(*args, **kwargs)


def suffix_match(name: str, suffixes: Sequence[str]) -> bool:
    """PEFT's rule for `modules_to_save` and `feedforward_modules` lists: a plain string suffix."""
    return any(name.endswith(s) for s in suffixes)


def saved_module_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The modules PEFT's `modules_to_save` = `names` selects: those whose name ends with one of them
    (outermost only); an error names a string that selects none, or a module an adapter holds."""
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or not suffix_match(name, names) or any(name.startswith(c + ".") for c in chosen):
            continue
        if any(hasattr(m, "disabled") for m in module.modules()) or ".lora_" in name:
            raise ValueError(f"modules_to_save {name!r} holds an adapter (LoRA layer, trainable tokens); "
                             "a module is either adapted or saved whole")
        if any(getattr(m, "quantized", False) for m in module.modules()):
            raise ValueError(f"modules_to_save {name!r} is stored in NF4 (QLoRA); it cannot train as a full copy")
        chosen.append(name)
    missing = [n for n in names if not any(c.endswith(n) for c in chosen)]
    if missing:
        raise ValueError(f"modules_to_save {', '.join(missing)} matches no module of the model")
    return chosen


def add_modules_to_save(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Wrap the modules `names` selects (PEFT's suffix rule) as trainable full copies; in place."""
    for name in saved_module_names(model, names):
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(name)
        setattr(model.get_submodule(parent) if parent else model, leaf, SavedModule(module).train(module.training))
    return model


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for name, m in model.named_modules():
        if isinstance(m, SavedModule):
            yield name, m


def saved_state(model: nn.Module) -> dict[str, Tensor]:
    """The trained copies' tensors under our names (`lm_head.modules_to_save.weight`)."""
    return {f"{name}.{COPY}.{key}": t for name, m in saved_modules(model)
            for key, t in m.modules_to_save.state_dict(keep_vars=True).items()}


def expected_saved_state(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors `add_modules_to_save(model, names)` would add, under our names."""
    return {f"{name}.{COPY}.{key}": tuple(t.shape) for name in saved_module_names(model, names)
            for key, t in model.get_submodule(name).state_dict().items()}


def unwrap_saved_modules(model: nn.Module) -> nn.Module:
    """Replace each `SavedModule` by its trained copy, frozen (merging); in place."""
    for name, m in list(saved_modules(model)):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, m.modules_to_save.requires_grad_(False))
    return model
