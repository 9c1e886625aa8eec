"""`lmforge plan`: parameters, FLOPs, memory per device and time of a training run, before running it.

Counts come from ModelConfig (`num_parameters`, `flops_per_token`, `kv_cache_bytes_per_token`) and
from the model built on the meta device (FSDP units, linear layers for NF4 and LoRA).
Memory is per device, in bytes, for bf16 mixed-precision AdamW:
- model states: bf16 weights 2 + bf16 gradients 2 + fp32 master weights 4 + Adam m and v 8 = 16 bytes
  per parameter (ZeRO, Rajbhandari et al. 2020). DDP keeps all of it on every device; FSDP/ZeRO-3
  shards all three over the devices and gathers one unit (a block, or the embeddings and head)
  at a time, whose bf16 weights and gradients (4 bytes per parameter) are held unsharded.
- QLoRA (Dettmers et al. 2023): the blocks' linear weights in NF4 with double quantisation
  (4 + 8/64 + 32/(64·256) = 4.127 bits per weight), the rest of the model in bf16, frozen; LoRA
  adapters of rank r on every linear layer of the blocks are the trainable parameters (16 bytes each).
  Each device holds the whole model (data parallel).
- activations: see `activation_bytes`; logits: see `logits_bytes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from lmforge.config import ModelConfig, parse_override
from lmforge.io import read_json
from lmforge.presets import preset as make_preset
from lmforge.scaling.law import PETAFLOP_DAY, TOKENS_PER_PARAMETER, count, si

Strategy = Literal["ddp", "fsdp", "qlora"]
Recompute = Literal["none", "selective", "full"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
RECOMPUTE: tuple[Recompute, ...] = get_args(Recompute)

WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 2, 2, 12  # bf16 weight, bf16 gradient, fp32 master + m + v
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
A100_BF16 = 312e12
GIB = 2**30


# ---- the terms -------------------------------------------------------------------------------


def model_state_bytes(params: float, strategy: Literal["ddp", "fsdp"], gpus: int = 1) -> tuple[float, float, float]:
    """(weights, gradients, AdamW states) per device for mixed-precision AdamW: 2 + 2 + 12 bytes per
    parameter; FSDP/ZeRO-3 divides all three by the number of devices, DDP none of them."""
    shards = gpus if strategy == "fsdp" else 1
    return WEIGHT_BYTES * params / shards, GRAD_BYTES * params / shards, ADAM_BYTES * params / shards


def activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, recompute: Recompute) -> float:
    """Activation memory of one micro-batch, bf16, no tensor parallelism (Korthikanti et al. 2022):
    - "none": every layer keeps s·b·h·(34 + 5·a·s/h) bytes, the a·s² attention scores included;
    - "selective": s·b·h·34 per layer, the scores recomputed; memory-efficient attention (SDPA,
      which lmforge uses) never stores them either, so this is lmforge's figure without checkpointing;
    - "full" (activation checkpointing): each layer keeps only its bf16 input, 2·s·b·h, and the layer
      being recomputed in the backward pass holds its s·b·h·34 once.
    The 34 counts a GPT-3 layer (4h GELU MLP, dropout masks); for SwiGLU and grouped-query
    attention it is an approximation."""
    s, b, h, a, layers = seq_len, micro_batch, model.hidden_size, model.num_attention_heads, model.num_hidden_layers
    if recompute == "none":
        return layers * s * b * h * (34 + 5 * a * s / h)
    if recompute == "selective":
        return layers * s * b * h * 34
    return layers * 2 * s * b * h + s * b * h * 34


def logits_bytes(model: ModelConfig, seq_len: int, micro_batch: int) -> float:
    """The fp32 logits the cross-entropy keeps for its backward pass, 4·s·b·V (Korthikanti et al. 2022, §4.3)."""
    return 4 * seq_len * micro_batch * model.vocab_size


@dataclass(frozen=True)
class Layout:
    """What the model built on the meta device holds."""

    largest_unit: int  # parameters of the largest FSDP unit: a block, or the rest (embeddings, head, final norm)
    linear_weights: int  # weights of the blocks' linear layers (MoE routers excepted): NF4 under QLoRA
    lora_params: int  # rank-r adapters A (r x in) and B (out x r) on each of those layers


def model_layout(model: ModelConfig, lora_rank: int) -> Layout:
    import torch
    from torch import nn

    from lmforge.model import SparseMoE, Transformer

    with torch.device("meta"):
        built = Transformer(model)
    blocks = [sum(p.numel() for p in block.parameters()) for block in built.model.layers]
    routers = {m.gate for m in built.modules() if isinstance(m, SparseMoE)}
    linears = [m for m in built.model.layers.modules() if isinstance(m, nn.Linear) and m not in routers]
    return Layout(
        largest_unit=max(blocks + [model.num_parameters() - sum(blocks)]),
        linear_weights=sum(m.weight.numel() for m in linears),
        lora_params=sum(lora_rank * (m.in_features + m.out_features) for m in linears),
    )


@dataclass(frozen=True)
class Memory:
    """Bytes per device."""

    weights: float
    gradients: float
    optimizer: float
    gathered: float = 0.0  # FSDP: the all-gathered unit's bf16 weights and gradients
    activations: float = 0.0
    logits: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.logits


def training_memory(strategy: Strategy, params: int, gpus: int, layout: Layout, activations: float,
                    logits: float) -> Memory:
    """Per-device memory of training `params` parameters with `strategy` on `gpus` devices."""
    if strategy == "qlora":
        lora = layout.lora_params
        base = NF4_BYTES * layout.linear_weights + WEIGHT_BYTES * (params - layout.linear_weights)
        return Memory(base + WEIGHT_BYTES * lora, GRAD_BYTES * lora, ADAM_BYTES * lora,
                      activations=activations, logits=logits)
    # FSDP gathers one unit beyond the shards; on one device the "shard" is already everything.
    gathered = (WEIGHT_BYTES + GRAD_BYTES) * layout.largest_unit if strategy == "fsdp" and gpus > 1 else 0.0
    return Memory(*model_state_bytes(params, strategy, gpus), gathered=gathered, activations=activations,
                  logits=logits)


# ---- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    name: str
    model: ModelConfig
    seq_len: int
    micro_batch: int
    tokens: float
    tokens_from: str  # where the token count came from
    gpus: int
    gpu_mem: float  # bytes per device
    strategy: Strategy
    recompute: Recompute
    peak_flops: float  # per device
    mfu: float
    lora_rank: int
    params: int
    non_embedding_params: int
    flops_per_token: int
    attention_flops_per_token: int
    activations: dict[Recompute, float]
    memory: dict[Strategy, Memory] = field(repr=False)

    @property
    def embedding_params(self) -> int:
        return self.params - self.non_embedding_params

    @property
    def train_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def chinchilla_flops(self) -> float:
        """C = 6ND."""
        return 6 * self.params * self.tokens

    @property
    def petaflop_days(self) -> float:
        return self.train_flops / PETAFLOP_DAY

    @property
    def seconds(self) -> float:
        return self.train_flops / (self.gpus * self.peak_flops * self.mfu)

    @property
    def kv_cache_bytes(self) -> float:
        """bf16 K and V for micro_batch sequences of seq_len tokens."""
        return self.model.kv_cache_bytes_per_token() * self.seq_len * self.micro_batch

    @property
    def inference_bytes(self) -> float:
        """One device serving the model: bf16 weights and the KV cache."""
        return WEIGHT_BYTES * self.params + self.kv_cache_bytes

    def fits(self, strategy: Strategy | None = None) -> bool:
        return self.memory[strategy or self.strategy].total <= self.gpu_mem


def plan_model(model: ModelConfig, *, name: str = "model", seq_len: int | None = None, micro_batch: int = 1,
               tokens: float | None = None, tokens_from: str = "--tokens", gpus: int = 1, gpu_mem: float = 80.0,
               strategy: Strategy = "ddp", recompute: Recompute = "selective", peak_flops: float = A100_BF16,
               mfu: float = 0.4, lora_rank: int = 8) -> Plan:
    """Plan training `model` on `tokens` tokens (default 20 per parameter) over `gpus` devices of
    `gpu_mem` GiB, `micro_batch` sequences of `seq_len` tokens (default the model's context) per device."""
    seq_len = seq_len or model.max_position_embeddings
    params = model.num_parameters()
    if tokens is None:
        tokens, tokens_from = TOKENS_PER_PARAMETER * params, f"{TOKENS_PER_PARAMETER} per parameter, Chinchilla's rule"
    _check(seq_len=seq_len, micro_batch=micro_batch, tokens=tokens, gpus=gpus, gpu_mem=gpu_mem,
           peak_flops=peak_flops, lora_rank=lora_rank)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    flops = model.flops_per_token(seq_len)
    activations = {r: activation_bytes(model, seq_len, micro_batch, r) for r in RECOMPUTE}
    logits = logits_bytes(model, seq_len, micro_batch)
    layout = model_layout(model, lora_rank)
    return Plan(
        name=name, model=model, seq_len=seq_len, micro_batch=micro_batch, tokens=float(tokens),
        tokens_from=tokens_from, gpus=gpus, gpu_mem=gpu_mem * GIB, strategy=strategy, recompute=recompute,
        peak_flops=peak_flops, mfu=mfu, lora_rank=lora_rank, params=params,
        non_embedding_params=model.num_parameters(embeddings=False), flops_per_token=flops,
        attention_flops_per_token=flops - 6 * model.matmul_parameters(),
        activations=activations,
        memory={s: training_memory(s, params, gpus, layout, activations[recompute], logits) for s in STRATEGIES},
    )


def plan(*, preset: str | None = None, config: str | Path | None = None, overrides: Sequence[str] = (),
         seq_len: int | None = None, micro_batch: int | None = None, tokens: float | None = None,
         gpus: int | None = None, strategy: Strategy | None = None, recompute: Recompute | None = None,
         **options: Any) -> Plan:
    """`lmforge plan`: a preset, or a file (a pretrain recipe, a config.json or an HF model directory).

    A recipe supplies the model and, unless given here, the sequence length, micro-batch, strategy,
    checkpointing and tokens (steps x micro-batch x accumulation x devices x sequence). `overrides`
    are `key=value` recipe fields for a recipe, ModelConfig fields otherwise. `options` go to `plan_model`."""
    if (preset is None) == (config is None):
        raise ValueError("give either a preset or a config file")
    defaults: dict[str, Any] = {}
    if preset is not None:
        model, name = make_preset(preset, **_fields(overrides)), preset
    else:
        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        if path.is_dir() or path.suffix == ".json":
            model = _from_hf(path, overrides)
        else:
            model, defaults = _from_recipe(path, overrides, gpus or 1)
        name = str(path)
    given = dict(seq_len=seq_len, micro_batch=micro_batch, gpus=gpus, strategy=strategy, recompute=recompute)
    if tokens is not None:
        given.update(tokens=tokens, tokens_from="--tokens")
    return plan_model(model, name=name, **{**defaults, **{k: v for k, v in given.items() if v is not None}}, **options)


def _check(**values: float) -> None:
    for key, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{key} must be a positive number, got {value!r}")


def _fields(overrides: Sequence[str]) -> dict[str, Any]:
    fields = {}
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) != 1:
            raise ValueError(f"override {item!r}: model fields are not nested (e.g. num_hidden_layers=40)")
        fields[keys[0]] = value
    return fields


def _from_hf(path: Path, overrides: Sequence[str]) -> ModelConfig:
    if path.is_dir():
        model = ModelConfig.from_dir(path)
    else:
        model = ModelConfig.from_hf(read_json(path), str(path))
    return ModelConfig(**{**model.model_dump(include=model.model_fields_set), **_fields(overrides)})


def _from_recipe(path: Path, overrides: Sequence[str], gpus: int) -> tuple[ModelConfig, dict[str, Any]]:
    """The model a pretrain recipe builds (vocabulary from its tokenizer when present) and its run shape."""
    from lmforge.train.pretrain import load_pretrain_config

    recipe = load_pretrain_config(path, overrides)
    spec, data, train = recipe.model, recipe.data, recipe.train
    if spec.init_from is not None:
        model = ModelConfig.from_dir(spec.init_from)
    else:
        if spec.preset is None:
            raise ValueError(f"{path}: model: give a preset or init_from")
        fields = dict(spec.overrides)
        if (data.tokenizer / "tokenizer.json").is_file():
            from lmforge.tokenizer import Tokenizer

            fields.setdefault("vocab_size", Tokenizer.from_dir(data.tokenizer).vocab_size)
        model = make_preset(spec.preset, **fields)
    tokens = train.steps * train.micro_batch_size * train.grad_accum * gpus * data.seq_len
    return model, dict(
        seq_len=data.seq_len, micro_batch=train.micro_batch_size, strategy=train.strategy,
        recompute="full" if train.activation_checkpointing else "selective",
        tokens=tokens, tokens_from=f"recipe: {train.steps} steps x {train.micro_batch_size * train.grad_accum * gpus}"
                                    f" sequences of {data.seq_len}",
    )


# ---- text ------------------------------------------------------------------------------------


def byte_unit(value: float) -> tuple[str, float]:
    """The binary unit that writes `value` bytes with a few digits before the point."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return unit, size
    return "bytes", 1


def in_bytes(value: float) -> str:
    unit, size = byte_unit(value)
    return f"{value / size:.3g} {unit}"


def duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.2g} s"


def render_plan(p: Plan) -> str:
    """The plan as a readable text table."""
    m = p.model
    kv_heads = f" ({m.num_key_value_heads} KV)" if m.num_key_value_heads != m.num_attention_heads else ""
    experts = f", {m.num_experts} experts (top {m.num_experts_per_tok})" if m.num_experts else ""
    unit, size = byte_unit(max(mem.total for mem in p.memory.values()))
    lines = [
        f"{p.name}: {m.family}, {m.num_hidden_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads{kv_heads}{experts}, vocab {m.vocab_size}",
        f"  parameters           {count(p.params)} (embedding {count(p.embedding_params)}, "
        f"non-embedding {count(p.non_embedding_params)})",
        "",
        f"Training compute (sequence {p.seq_len})",
        f"  per token            {si(p.flops_per_token, 'FLOP')} = 6 x {count(m.matmul_parameters())} matmul parameters + "
        f"{si(p.attention_flops_per_token, 'FLOP')} attention (PaLM); 6N = {si(6 * p.params, 'FLOP')}",
        f"  tokens               {count(p.tokens)} ({p.tokens_from})",
        f"  total                {p.train_flops:.3g} FLOPs = {p.petaflop_days:,.4g} petaFLOP/s-days "
        f"(6ND = {p.chinchilla_flops:.3g})",
        f"  time                 {duration(p.seconds)} on {p.gpus} GPU{'s' * (p.gpus > 1)} at "
        f"{p.mfu:.0%} MFU of {si(p.peak_flops, 'FLOP/s')} each",
        "",
        f"Memory per device, {unit} ({p.gpus} x {p.gpu_mem / GIB:g} GiB; micro-batch {p.micro_batch} x {p.seq_len} "
        f"tokens; bf16 mixed-precision AdamW; QLoRA rank {p.lora_rank})",
        f"  {'':34}" + "".join(f"{s.upper() + (' *' if s == p.strategy else ''):>10}" for s in STRATEGIES),
    ]
    rows = [
        ("weights", "weights"), ("gradients", "gradients"), ("AdamW states (fp32 master, m, v)", "optimizer"),
        ("FSDP gathered unit", "gathered"), (f"activations ({p.recompute} recompute)", "activations"),
        ("logits (fp32, for the loss)", "logits"), ("total", "total"),
    ]
    for label, attr in rows:
        cells = [getattr(p.memory[s], attr) for s in STRATEGIES]
        lines.append(f"  {label:34}" + "".join(f"{v / size:>10.2f}" if v else f"{'-':>10}" for v in cells))
    lines += [
        f"  {'fits':34}" + "".join(f"{'yes' if p.fits(s) else 'NO':>10}" for s in STRATEGIES),
        "  activations by recompute: " + ", ".join(f"{r} {in_bytes(v)}" for r, v in p.activations.items())
        + " (Korthikanti et al. 2022)",
        "",
        f"Inference on one device: bf16 weights {in_bytes(WEIGHT_BYTES * p.params)} + KV cache "
        f"{in_bytes(p.kv_cache_bytes)} ({in_bytes(m.kv_cache_bytes_per_token())} per token, "
        f"{p.micro_batch} x {p.seq_len} tokens) = {in_bytes(p.inference_bytes)}, "
        f"{'fits' if p.inference_bytes <= p.gpu_mem else 'does NOT fit'}",
    ]
    return "\n".join(lines)
