"""Weight-only int8 and int4 linear layers for CPU inference (`--quantize int8|int4`).

torchao quantizes each weight: int8 per output channel, symmetric (`Int8Tensor`: scale = max|w| / 127.5,
q = round(w / scale) in [-128, 127]), and int4 in groups of `group_size` input features, asymmetric
(`Int4OpaqueTensor`: per group scale = (max - min) / 15 and zero = min + 8 * scale, q = round((w - zero) / scale) + 8
in [0, 15], packed for the CPU kernel). The layers call torch's CPU kernels for float activations times integer
weights, `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` (the one torchao's int4 CPU tensor calls; its int8
weight-only forward turns the whole weight back into floats at every call, slower than the dense layer). Both kernels
are fast with bfloat16 activations and several times slower than a dense float32 layer with float32 ones, so
`Quantization.apply` computes in bfloat16 unless told otherwise. A compiled engine decodes a single sequence of an
int8 model through its C step instead (`native_step`: the int8 rows times float32 activations). The int4 packing follows the CPU's instruction set:
a quantized model is built where it runs, never saved.

Quantized: every linear layer of the decoder (attention, MLP, experts) and the output head. Kept in float: the
embeddings (a decode step reads one row per token: quantizing them would save memory, not time), norms, and a mixture
of experts' router (a few rows whose rounding would change which experts run). Under int4 the head is int8, as
llama.cpp's Q4_0 keeps its output tensor finer (Q6_K, or Q8_0 where rows are no multiple of 256): the logits take
the quantization error directly. A layer int4 cannot pack (output features not a multiple of 16, input features not a multiple of the group
size) is int8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.checkpoint import resolve_dtype
from lmforge.model import SparseMoE, Transformer
from lmforge.peft.lora import FrozenLinear

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)  # what torchao's CPU int4 tensor accepts
DEFAULT_GROUP_SIZE = 32  # llama.cpp's Q4_0 block
INT4_ROWS = 16  # the CPU int4 packing takes output features in multiples of this
COMPUTE_DTYPE = torch.bfloat16  # activations the integer-weight kernels are fast with
DECODER_ONLY = "--quantize applies to decoder-only models, not to an encoder-decoder model such as T5"


def check_quantization(method: str, group_size: int) -> None:
    """Raise a `ValueError` naming the flag for an unknown method or an int4 group size the kernel lacks."""
    if method not in METHODS:
        raise ValueError(f"--quantize: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size: int4 groups of {', '.join(map(str, GROUP_SIZES))} input features, "
                         f"got {group_size}")


class Int8Linear(nn.Module):
    """y = (x Q^T) * scale + b, with Q (out, in) int8 and one scale per output feature."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torchao.quantization import Int8Tensor, PerRow

        self.out_features, self.in_features = linear.weight.shape
        weight = Int8Tensor.from_hp(linear.weight.detach().float(), granularity=PerRow())
        self.register_buffer("qweight", weight.qdata)
        self.register_buffer("scale", weight.scale.flatten().to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per output feature"


class Int4Linear(nn.Module):
    """y = x W^T + b with W = (q - 8) * scale + zero, q in [0, 15] packed two per byte, one scale and zero per
    output feature and group of `group_size` input features (`scale_and_zero`: (in / group_size, out, 2))."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        self.out_features, self.in_features = linear.weight.shape
        self.group_size = group_size
        weight = Int4OpaqueTensor.from_hp(linear.weight.detach().float(), [1, group_size])
        self.register_buffer("qweight", weight.qdata)
        self.register_buffer("scale_and_zero", weight.scale_and_zero.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scale_and_zero)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 in groups of {self.group_size}"


def packs_int4(linear: nn.Linear, group_size: int) -> bool:
    out_features, in_features = linear.weight.shape
    return out_features % INT4_ROWS == 0 and in_features % group_size == 0


def quantize_weights(model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Replace, in place, the linear layers of a decoder-only model's blocks and its output head by `Int8Linear`s
    (`method` "int8") or `Int4Linear`s in groups of `group_size` input features ("int4"; the head and layers int4
    cannot pack stay int8). The model must be on the CPU with any LoRA adapter merged."""
    check_quantization(method, group_size)
    if not isinstance(model, Transformer):
        raise ValueError(f"{DECODER_ONLY} (got a {type(model).__name__})")
    if any(isinstance(m, FrozenLinear) for m in model.modules()):
        raise ValueError("--quantize needs plain linear layers: merge the LoRA adapter first (Session.load and "
                         "`lmforge merge` do)")
    if (device := next(model.parameters()).device).type != "cpu":
        raise ValueError(f"--quantize runs on the CPU (torch's integer-weight CPU kernels), not on {device}")
    routers = {id(m.gate) for m in model.modules() if isinstance(m, SparseMoE)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or id(child) in routers:
                continue
            int4 = method == "int4" and child is not model.lm_head and packs_int4(child, group_size)
            setattr(parent, name, Int4Linear(child, group_size) if int4 else Int8Linear(child))


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of a loaded model: `method` int8 or int4, `group_size` input features per int4
    scale and zero."""

    method: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        check_quantization(self.method, self.group_size)

    def apply(self, model: nn.Module, dtype: str | torch.dtype | None = None) -> None:
        """Quantize `model` (best loaded in float32: the scales come from its weights) and cast what stays in float
        (embeddings, norms, scales) to `dtype`, the activations' (default bfloat16)."""
        quantize_weights(model, self.method, self.group_size)
        model.to(COMPUTE_DTYPE if dtype is None else resolve_dtype(dtype))
