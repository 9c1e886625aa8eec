"""What every family's `config.json` spelling shares: the `Spelling` interface (a reader into
`ModelConfig` fields and a writer back), the RoPE keys of transformers 4 and 5, and the refusal to
write a config the family cannot express."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.config import ModelConfig


class Spelling:
    """How one family spells `config.json`: the `architectures` and `model_type` it is named by, and the
    family's own keys, read into `ModelConfig` fields and written back. The keys every family shares
    (architectures, model_type, vocab_size, token ids, dtype, initializer range, tie_word_embeddings,
    use_cache) are `ModelConfig.from_hf`/`to_hf`'s; a reader still reads the family's vocabulary size and
    tying (their defaults differ)."""

    def __init__(self, architecture: str, model_type: str) -> None:
        self.architecture = architecture
        self.model_type = model_type

    def read(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        """`ModelConfig` fields (less the token ids, dtype and initializer range) from a config.json dict;
        a one-line `ValueError` naming `source` for what lmforge cannot load."""
        raise NotImplementedError

    def write(self, config: ModelConfig) -> dict[str, Any]:
        """The family's config.json keys beyond the shared ones (transformers-5 style, with the keys
        older readers look for)."""
        raise NotImplementedError


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
    (transformers 4, `type` or `rope_type`); the scaling is {} for plain RoPE. Of a RoPE per layer type
    (Gemma 3 in transformers 5), the full-attention layers'."""
    rope = hf.get("rope_parameters") or {}
    rope = rope.get("full_attention") or {k: v for k, v in rope.items() if k != "sliding_attention"}
    scaling = dict(hf.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    return theta, {} if scaling.get("rope_type", "default") == "default" else scaling


def rope_parameters(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """transformers 5's `rope_parameters` of the (global) rotary embedding, with `extra` keys."""
    return {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta, **extra}


def rope_hf(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The RoPE keys of config.json: `rope_parameters` (transformers 5), `rope_theta` and `rope_scaling` (4)."""
    return dict(rope_parameters=rope_parameters(config, **extra), rope_theta=config.rope_theta,
                rope_scaling=config.rope_scaling)


def cannot_spell(config: ModelConfig, **expected: Any) -> None:
    """Raise unless `config` has the `expected` field values (what the family's config.json can express)."""
    for field, want in expected.items():
        if getattr(config, field) != want:
            got = getattr(config, field)
            raise ValueError(f"family {config.family!r} cannot express {field}={got!r} in config.json")
