"""A compiled engine's batch-1 CPU decode step, in C (`native_step.c`), for Llama-family decoders.

At batch 1 a decode step reads every weight once; in PyTorch, even compiled, the step also pays for its kernels'
launches and for dynamo's guards, and inductor's reductions keep one accumulator. `native_step.c` does the step in
one OpenMP parallel region with multi-accumulator dot products over float32, bfloat16 or int8 weights (float32
activations, as llama.cpp computes). It is built once per machine with the system C compiler (`cc`, or `$CC`) for the
CPU it runs on, and cached under `~/.cache/lmforge/native` (`$XDG_CACHE_HOME`). `unsupported` names what it cannot
run (the engine then keeps its compiled PyTorch step); model.py is the reference it is tested against.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from ctypes import POINTER, c_float, c_int32, c_void_p
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.generate.matvec import MatVecLinear
from lmforge.generate.quantize import Int8Linear
from lmforge.kv_cache import KVCache
from lmforge.model import OffsetRMSNorm, ScaledEmbedding, SwiGLU, Transformer

SOURCE = Path(__file__).with_name("native_step.c")
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}


class CLinear(ctypes.Structure):
    _fields_ = [("weight", c_void_p), ("scale", c_void_p), ("bias", c_void_p),
                ("rows", c_int32), ("cols", c_int32), ("kind", c_int32)]


class CLayer(ctypes.Structure):
    _fields_ = [("attn_norm", c_void_p), ("mlp_norm", c_void_p), ("q_norm", c_void_p), ("k_norm", c_void_p),
                *((name, CLinear) for name in ("q", "k", "v", "o", "gate", "up", "down")),
                ("k_cache", c_void_p), ("v_cache", c_void_p), ("window", c_int32)]


class CModel(ctypes.Structure):
    _fields_ = [*((name, c_int32) for name in ("dim", "layers", "heads", "kv_heads", "head_dim", "rotary_dim", "hidden",
                                              "vocab", "max_len", "embed_kind", "cache_kind", "act", "threads")),
                ("norm_eps", c_float), ("attn_scale", c_float), ("embed_scale", c_float),
                ("embed", c_void_p), ("cos", c_void_p), ("sin", c_void_p), ("final_norm", c_void_p),
                ("head", CLinear), ("layer", POINTER(CLayer)),
                *((name, c_void_p) for name in ("x", "normed", "qkv", "att", "gated", "scores"))]


class NativeBuildError(RuntimeError):
    """The C compiler is missing or failed (its message attached)."""


def unsupported(model: nn.Module) -> str | None:
    """What of `model` the C step cannot run (None: it runs all of it)."""
    if type(model) is not Transformer:
        return f"a {type(model).__name__} (the C step runs a plain decoder)"
    config, decoder = model.config, model.model
    if decoder.embed_tokens.weight.dtype not in (torch.float32, torch.bfloat16):
        return f"{decoder.embed_tokens.weight.dtype} weights"
    if decoder.embed_tokens.weight.device.type != "cpu":
        return "a model off the CPU"
    reasons = {
        "positions other than RoPE": config.position != "rope",
        "LongRoPE's two frequency sets": decoder.long_inv_freq is not None,
        "a second RoPE table for sliding layers": config.rope_local_base_freq is not None,
        "LayerNorm": config.norm != "rmsnorm",
        "a norm after the embeddings": config.embedding_norm,
        "norms after attention and MLP": config.post_norms,
        "attention and MLP in parallel": config.parallel_residual,
        "soft-capped scores or logits": config.attn_logit_softcapping is not None
        or config.final_logit_softcapping is not None,
        "an MLP other than a gated one (experts, GELU)": any(type(b.mlp) is not SwiGLU for b in decoder.layers),
        f"the {config.hidden_act} activation": config.hidden_act not in ACTIVATIONS,
    }
    if reason := next((reason for reason, applies in reasons.items() if applies), None):
        return reason
    for module in [module for block in decoder.layers for module, _ in projections(block).values()] + [model.lm_head]:
        if not runs_in_c(module):
            of = f" of {module.weight.dtype}" if type(module) is nn.Linear else ""
            return f"{type(module).__name__} layers{of}"
    return None


def runs_in_c(module: nn.Module) -> bool:
    """Whether the C step computes this layer: a plain float32/bfloat16 linear or an `Int8Linear`."""
    if isinstance(module, Int8Linear):
        return True
    return type(module) in (nn.Linear, MatVecLinear) and module.weight.dtype in (torch.float32, torch.bfloat16)


def projections(block: nn.Module) -> dict[str, tuple[nn.Module, slice]]:
    """A block's seven projections as (layer, its rows): fused q/k/v and gate/up layers are read in parts."""
    attn, mlp = block.self_attn, block.mlp
    q_rows, kv_rows = attn.n_heads * attn.head_dim, attn.n_kv * attn.head_dim
    hidden = mlp.down_proj.in_features
    everything = slice(None)
    if attn.qkv_proj is not None:
        qkv = {"q": (attn.qkv_proj, slice(0, q_rows)), "k": (attn.qkv_proj, slice(q_rows, q_rows + kv_rows)),
               "v": (attn.qkv_proj, slice(q_rows + kv_rows, q_rows + 2 * kv_rows))}
    else:
        qkv = {"q": (attn.q_proj, everything), "k": (attn.k_proj, everything), "v": (attn.v_proj, everything)}
    if mlp.gate_up_proj is not None:
        gate_up = {"gate": (mlp.gate_up_proj, slice(0, hidden)), "up": (mlp.gate_up_proj, slice(hidden, 2 * hidden))}
    else:
        gate_up = {"gate": (mlp.gate_proj, everything), "up": (mlp.up_proj, everything)}
    return {**qkv, "o": (attn.o_proj, everything), **gate_up, "down": (mlp.down_proj, everything)}


def cpu_model() -> str:
    """This CPU's model name and instruction-set flags (what `-march=native` compiles for), where Linux tells."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return "\n".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "native"


@functools.cache
def library(arch: str = "native") -> ctypes.CDLL:
    """`native_step.c` built with `-march=arch` (cached by source, compiler and CPU); `NativeBuildError` if it cannot
    be built."""
    compiler = os.environ.get("CC") or "cc"
    flags = ["-O3", f"-march={arch}", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise NativeBuildError(f"no C compiler to build {SOURCE.name} ({compiler}: {error})") from None
    cpu = cpu_model()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), cpu.encode()])).hexdigest()
    path = cache_dir() / f"native_step-{key[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            run = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE), "-lm"], capture_output=True,
                                 text=True)
            if run.returncode:
                raise NativeBuildError(f"{compiler} could not build {SOURCE.name}:\n{run.stderr}")
            os.replace(built, path)  # atomic: a concurrent build writes the same file
    lib = ctypes.CDLL(str(path))
    lib.lmforge_decode_step.argtypes = [POINTER(CModel), c_int32, c_int32, c_void_p]
    lib.lmforge_decode_step.restype = None
    return lib


def native_step(model: Transformer) -> NativeStep | None:
    """The C step for `model`, or None where it cannot run it (`unsupported`) or no C compiler builds it (warned)."""
    if unsupported(model) is not None:
        return None
    try:
        return NativeStep(model)
    except NativeBuildError as error:
        warnings.warn(f"decoding through torch.compile instead: {error}", stacklevel=2)
        return None


class NativeStep:
    """Decode one token of one sequence through `native_step.c`, reading `model`'s tensors in place (no copies but
    float32 norms, scales and biases) and writing keys and values into a `StaticKVCache` of batch 1."""

    def __init__(self, model: Transformer, lib: ctypes.CDLL | None = None) -> None:
        if reason := unsupported(model):
            raise ValueError(f"the C decode step cannot run {reason}")
        self.lib = lib or library()
        self.model = model
        config, decoder = model.config, model.model
        self.kept: list[Tensor] = []  # every tensor the structs point into
        self.layers = (CLayer * config.num_hidden_layers)()
        for index, block in enumerate(decoder.layers):
            layer, attn = self.layers[index], block.self_attn
            layer.attn_norm = self.gain(block.input_layernorm)
            layer.mlp_norm = self.gain(block.post_attention_layernorm)
            if attn.qk_norm:
                layer.q_norm, layer.k_norm = self.gain(attn.q_norm), self.gain(attn.k_norm)
            for name, (module, rows) in projections(block).items():
                setattr(layer, name, self.linear(module, rows))
            layer.window = block.window or 0
        embed = decoder.embed_tokens
        rotary_dim = decoder.inv_freq.shape[0] * 2
        self.c = CModel(
            dim=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads, head_dim=config.head_dim, rotary_dim=rotary_dim,
            hidden=decoder.layers[0].mlp.down_proj.in_features, vocab=config.vocab_size,
            embed_kind=KINDS[embed.weight.dtype], act=ACTIVATIONS[config.hidden_act],
            norm_eps=config.norm_eps, attn_scale=decoder.layers[0].self_attn.scale,
            embed_scale=float(embed.scale()) if isinstance(embed, ScaledEmbedding) else 1.0,
            embed=self.pointer(embed.weight), final_norm=self.gain(decoder.norm),
            head=self.linear(model.lm_head, slice(None)), layer=self.layers,
        )
        q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        scratch = {"x": config.hidden_size, "qkv": q_rows + 2 * kv_rows, "att": q_rows, "gated": self.c.hidden}
        for name, size in scratch.items():
            setattr(self.c, name, self.pointer(torch.zeros(size)))
        self.cache: KVCache | None = None

    def pointer(self, tensor: Tensor) -> int:
        """The address of `tensor` (contiguous), kept alive as long as this step."""
        tensor = tensor.detach().contiguous()
        self.kept.append(tensor)
        return tensor.data_ptr()

    def gain(self, norm: nn.Module) -> int:
        """A norm's float32 gain, Gemma's offset added."""
        weight = norm.weight.detach().float()
        return self.pointer(1.0 + weight if isinstance(norm, OffsetRMSNorm) else weight)

    def linear(self, module: nn.Module, rows: slice) -> CLinear:
        if isinstance(module, Int8Linear):
            weight, scale = module.qweight[rows], self.pointer(module.scale[rows].float())
        else:
            weight, scale = module.weight.detach()[rows], None
        bias = None if module.bias is None else self.pointer(module.bias.detach()[rows].float())
        return CLinear(weight=self.pointer(weight), scale=scale, bias=bias, rows=weight.shape[0], cols=weight.shape[1],
                       kind=KINDS[weight.dtype])

    def bind(self, cache: KVCache) -> None:
        """Point the layers at `cache`'s tensors; size the RoPE tables and the scores for its slots."""
        if not cache.static or cache.k[0].shape[0] != 1:
            raise ValueError("the C decode step writes a StaticKVCache of one sequence")
        if cache.k[0].dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the C decode step keeps float32 or bfloat16 keys and values, not {cache.k[0].dtype}")
        for layer, k, v in zip(self.layers, cache.k, cache.v):
            layer.k_cache, layer.v_cache = k.data_ptr(), v.data_ptr()
        self.c.cache_kind = KINDS[cache.k[0].dtype]
        if cache.max_len != self.c.max_len:
            cos, sin = self.model.model.rotary(torch.arange(cache.max_len)[None], torch.float32)
            self.tables = cos[0, 0].contiguous(), sin[0, 0].contiguous(), torch.zeros(self.c.heads * cache.max_len)
            self.c.cos, self.c.sin, self.c.scores = (t.data_ptr() for t in self.tables)
            self.c.max_len = cache.max_len
        self.cache = cache

    def __call__(self, token: int, cache: KVCache) -> Tensor:
        """Logits (1, vocab), float32, after feeding `token` at the cache's next slot (the cache advances)."""
        if cache is not self.cache:
            self.bind(cache)
        threads = torch.get_num_threads()
        if threads != self.c.threads:
            self.normed = torch.zeros(threads * self.c.dim)  # one normalised input per thread
            self.c.normed, self.c.threads = self.normed.data_ptr(), threads
        if not 0 <= token < self.c.vocab:
            raise ValueError(f"token id {token} is outside the vocabulary of {self.c.vocab}")
        position = int(cache.length)
        if position >= cache.max_len:
            raise ValueError(f"KV cache is full: {position + 1} tokens exceed its {cache.max_len} slots")
        logits = torch.empty(1, self.c.vocab)
        self.lib.lmforge_decode_step(ctypes.byref(self.c), token, position, logits.data_ptr())
        cache.advance(1)
        return logits
