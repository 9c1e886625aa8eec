"""Typed configuration: the model (transformers-compatible `config.json`), YAML recipes + overrides
(named model sizes are in `lmforge.presets`)."""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lmforge.families import SPELLINGS, family_of
from lmforge.io import read_config_json

Family = Literal["llama", "mistral", "mixtral", "qwen2", "gpt2", "gemma", "gemma2", "gemma3", "qwen3", "qwen3_moe",
                 "phi3", "falcon", "bloom"]


class ModelConfig(BaseModel):
    """Everything the decoder needs. Behaviour is switched by fields, never by the family name;
    `family` only decides how `config.json` and checkpoint keys are spelled on disk."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    family: Family = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    position: Literal["rope", "learned", "alibi"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # bias on q, k, v and o (Llama's flag, GPT-2)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[Literal["full_attention", "sliding_attention"]] | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 2
    # Gemma, Gemma 2/3, Qwen3 and Qwen3-MoE
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = "silu"  # the gated MLP's gate activation (GeGLU: tanh GELU)
    norm_offset: bool = False  # RMSNorm computes x_normed * (1 + weight) in float32 (weights stored as offsets)
    scale_embeddings: bool = False  # token embeddings times sqrt(hidden_size), cast to the weights' dtype
    post_norms: bool = False  # norms after attention and the MLP too (Gemma 2/3's four norms per block)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE
    query_pre_attn_scalar: int | None = None  # attention scores scaled by its -1/2 power (default head_dim)
    attn_logit_softcapping: float | None = None  # scores become cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits become cap * tanh(logits / cap)
    rope_local_base_freq: float | None = None  # RoPE base of sliding-window layers (unscaled); None: rope_theta
    moe_intermediate_size: int | None = None  # each expert's hidden size (None: intermediate_size)
    norm_topk_prob: bool = True  # renormalise the chosen experts' router probabilities (Mixtral)
    decoder_sparse_step: int = 1  # every n-th layer is a mixture of experts ...
    mlp_only_layers: list[int] = []  # ... except these, which keep a dense MLP
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    torch_dtype: str = "float32"
    # Phi-3, Falcon and BLOOM: partial rotary, parallel blocks, an embedding norm, exact GELU.
    partial_rotary_factor: float = 1.0  # rotate only the first int(head_dim x factor) dims of each head
    parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm'(x)) instead of two residual steps
    shared_block_norm: bool = False  # one norm feeds both attention and MLP (Falcon-7B); needs parallel_residual
    embedding_norm: bool = False  # a norm right after the token embeddings (BLOOM)
    gelu_approximate: Literal["tanh", "none"] = "tanh"  # F.gelu's `approximate`: tanh (GPT-2, BLOOM), erf (Falcon)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        # Derived values are not marked as set, so `preset(name, hidden_size=...)` derives them afresh.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        _check_rope(self)
        if self.shared_block_norm and not self.parallel_residual:
            raise ValueError("shared_block_norm needs parallel_residual (a sequential block normalises twice)")
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok exceeds num_experts")
        return self

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is a mixture of experts."""
        step = self.decoder_sparse_step
        return bool(self.num_experts) and layer not in self.mlp_only_layers and (layer + 1) % step == 0

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (transformers: int(head_dim x partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # ---- counting -------------------------------------------------------------------------

    def num_parameters(self, *, embeddings: bool = True) -> int:
        """Exact parameter count of the model this config builds; `embeddings=False` leaves out
        the token and position embeddings and the output head (Kaplan's non-embedding N)."""
        d, L, hd = self.hidden_size, self.num_hidden_layers, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * (q + 2 * kv) + q * d
        attn += (q + 2 * kv if self.attention_bias or self.qkv_bias else 0) + (d if self.attention_bias else 0)
        per_feature = 1 if self.norm == "rmsnorm" else 2
        attn += 2 * hd * per_feature if self.qk_norm else 0
        norm = d * per_feature
        mlp = sum(self._layer_mlp_parameters(layer) for layer in range(L))
        block_norms = 4 if self.post_norms else 1 if self.shared_block_norm else 2
        total = L * (attn + block_norms * norm) + mlp + norm * (2 if self.embedding_norm else 1)
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
            if self.position == "learned":
                total += self.max_position_embeddings * d
        return total

    def num_active_parameters(self) -> int:
        """Parameters touched per token (differs from the total only for mixtures of experts)."""
        inactive = (self.num_experts - self.num_experts_per_tok) * self._mlp_parameters(self._expert_size())
        sparse = sum(self.is_sparse(layer) for layer in range(self.num_hidden_layers))
        return self.num_parameters(embeddings=False) - sparse * inactive

    def _expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def _layer_mlp_parameters(self, layer: int) -> int:
        """Layer `layer`'s MLP: dense, or all its experts and the router."""
        if self.is_sparse(layer):
            return self.num_experts * (self._mlp_parameters(self._expert_size()) + self.hidden_size)
        return self._mlp_parameters(self.intermediate_size)

    def _mlp_parameters(self, size: int) -> int:
        """One MLP's (or one expert's) weights and biases at hidden size `size`."""
        n_mats = 3 if self.mlp == "swiglu" else 2
        biases = (n_mats - 1) * size + self.hidden_size if self.mlp_bias else 0
        return n_mats * self.hidden_size * size + biases

    def matmul_parameters(self) -> int:
        """Weights of the matrix multiplies one token goes through: attention and the active experts'
        (or the dense) MLP matrices, the router, and the output head; no norms, biases or embeddings."""
        d, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = 0
        for layer in range(self.num_hidden_layers):
            sparse = self.is_sparse(layer)
            mlp += self.num_experts_per_tok * n_mats * d * self._expert_size() + d * self.num_experts if sparse \
                else n_mats * d * self.intermediate_size
        return self.num_hidden_layers * (d * (q + 2 * kv) + q * d) + mlp + self.vocab_size * d

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 x `matmul_parameters` + 12 x layers x heads x head_dim x
        seq_len for the attention scores (PaLM, appendix B; causal masking not discounted, as MFU
        is conventionally reported)."""
        seq_len = seq_len or self.max_position_embeddings
        attention = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * self.matmul_parameters() + attention

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of K and V cached per token of context across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * bytes_per_value

    # ---- transformers' config.json ---------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a transformers `config.json` dict (transformers 4 or 5 style); the family's own keys are
        read by its spelling in `lmforge.families`."""
        family = family_of(hf, source)
        fields = SPELLINGS[family].read(hf, source)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"):
            if key in hf:
                fields[key] = hf[key]
        fields["torch_dtype"] = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        try:
            return cls(family=family, **fields)
        except ValidationError as e:
            raise ValueError(f"{source}: {explain(e, cls)}") from None

    def to_hf(self) -> dict[str, Any]:
        """Write transformers' `config.json` for this family (transformers-5 style, 4 keys kept for older readers)."""
        spelling = SPELLINGS[self.family]
        common = dict(
            architectures=[spelling.architecture],
            model_type=spelling.model_type,
            vocab_size=self.vocab_size,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
            tie_word_embeddings=self.tie_word_embeddings,
            dtype=self.torch_dtype,
            torch_dtype=self.torch_dtype,
            use_cache=True,
        )
        return copy.deepcopy(dict(common, **spelling.write(self)))  # copies: readers such as transformers edit theirs

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from an HF model directory."""
        hf, source = read_config_json(path)
        return cls.from_hf(hf, source=source)


ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def _check_rope(config: ModelConfig) -> None:
    """`partial_rotary_factor` and `rope_scaling` as transformers validates them (its warnings made errors)."""
    if not 0 < config.partial_rotary_factor <= 1 or config.rotary_dim < 2 or config.rotary_dim % 2:
        raise ValueError(f"partial_rotary_factor {config.partial_rotary_factor} gives rotary dim {config.rotary_dim} "
                         f"of head_dim {config.head_dim}; it must be even and at least 2")
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    if rope_type != "longrope":
        return
    missing = [k for k in ("short_factor", "long_factor", "original_max_position_embeddings") if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling (longrope) lacks {', '.join(missing)}")
    for key in ("short_factor", "long_factor"):
        factors = scaling[key]
        if not isinstance(factors, list) or len(factors) != config.rotary_dim // 2 or not all(
                isinstance(f, (int, float)) and f > 0 for f in factors):
            raise ValueError(f"rope_scaling.{key} must be {config.rotary_dim // 2} positive numbers, "
                             "one per rotary frequency")
    original = scaling["original_max_position_embeddings"]
    if not isinstance(original, int) or original < 1:
        raise ValueError(f"rope_scaling.original_max_position_embeddings must be a positive integer (got {original!r})")
    for key in ("factor", "attention_factor"):
        value = scaling.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"rope_scaling.{key} must be a positive number (got {value!r})")


# ---- YAML recipes with key=value overrides ---------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` (no dot) as a string; read it as a float, as YAML 1.2 and Python do."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3); the value is parsed as YAML (numbers, booleans, lists)."""
    key, eq, raw = item.partition("=")
    keys = key.strip().split(".")
    if not eq or not all(keys):
        raise ValueError(f"override {item!r} is not of the form key=value (dotted key, e.g. train.lr=3e-4)")
    return keys, yaml.load(raw, Loader=_YamlLoader) if raw else ""


def load_yaml(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a YAML recipe and apply `key=value` overrides (dotted keys reach nested sections)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_YamlLoader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = value
    return data


Recipe = TypeVar("Recipe", bound=BaseModel)


def load_recipe(cls: type[Recipe], path: str | Path, overrides: list[str] = ()) -> Recipe:
    """A YAML recipe with `key=value` overrides, validated as `cls`; a bad field is a one-line
    `ValueError` naming the file and the dotted key (and, for an unknown key, the nearest valid one)."""
    try:
        return cls.model_validate(load_yaml(path, overrides))
    except ValidationError as e:
        raise ValueError(f"{path}: {explain(e, cls)}") from None


def explain(error: ValidationError, cls: type[BaseModel]) -> str:
    """The first problem of a pydantic error in one line (a misspelt key before what it left missing),
    with a count of the others."""
    first = min(error.errors(), key=lambda err: err["type"] != "extra_forbidden")
    first["loc"] = tuple(part for part in first["loc"] if not _is_union_tag(part))
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        section = _model_at(cls, first["loc"][:-1])
        valid = list(section.model_fields) if section else []
        near = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
        prefix = ".".join(loc[:-1] + [""])
        hint = f"; did you mean '{prefix}{near[0]}'?" if near else (f"; valid keys: {', '.join(valid)}" if valid else "")
        message = f"unknown key '{key}'{hint}"
    else:
        got = f" (got {first['input']!r})" if first["type"] != "missing" and not isinstance(first["input"], dict) else ""
        message = f"{key + ': ' if key else ''}{first['msg']}{got}"
    others = error.error_count() - 1
    return message + (f" (and {others} more problem{'s' * (others > 1)})" if others else "")


def _is_union_tag(part: Any) -> bool:
    """Whether a location part names the member of a union of models (pydantic tags them by class name,
    CamelCase, where field names are snake_case)."""
    return isinstance(part, str) and part[:1].isupper() and part.isidentifier() and "_" not in part


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `loc` inside `cls` (list indices skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        cls = _model_in(field.annotation) if field else None
        if cls is None:
            return None
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None
