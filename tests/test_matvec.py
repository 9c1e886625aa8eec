"""The compiled CPU decode step's single-row products (`lmforge.generate.matvec`): the sums against float64, the
compiled layers and engines against their eager selves, and the generated code free of the linear layers' and SDPA's
library calls."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import sharp_hf_model
from torch import nn
from torch._inductor.utils import run_and_get_code

from lmforge.checkpoint import load_model
from lmforge.generate.engine import Engine
from lmforge.generate.matvec import CASCADE_SUM_SIZE, MatVecLinear, matvec, use_matvec_linears
from lmforge.generate.quantize import Quantization
from lmforge.generate.sampling import SamplingParams
from lmforge.model import fuse_projections

F32_EPS, BF16_EPS = 2.0**-24, 2.0**-8  # unit roundoffs
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]]
# library calls of a float linear layer's product or of SDPA in inductor's generated code (attention's own two small
# batched products stay `extern_kernels.bmm` calls; int8 layers keep torch's int8 kernel)
LIBRARY_CALLS = ("extern_kernels.mm", "extern_kernels.addmm", "aten.mm", "aten.addmm", "mkl", "scaled_dot_product")


def sum_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The rounding bound of K-term float32 sums of x w products: 2 K eps sum |x w|."""
    return 2 * x.shape[-1] * F32_EPS * (x.double().abs() @ weight.double().abs().t()) + 1e-7


@pytest.mark.parametrize("features", [96, 2 * CASCADE_SUM_SIZE + 3], ids=["one-sum", "three-sums"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_sums_in_float32(weight_dtype, dtype, features):
    """x Wᵀ against float64, eager and compiled: within float32 sums, then one rounding to x's dtype."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, features, generator=generator).to(dtype)
    weight = torch.randn(40, features, generator=generator).to(weight_dtype)
    y = matvec(x, weight)
    torch._dynamo.reset()
    compiled = torch.compile(matvec, fullgraph=True, dynamic=False)(x, weight)
    assert compiled.shape == y.shape and compiled.dtype == y.dtype
    assert y.shape == (1, 1, 40) and y.dtype == dtype
    ref = x.double() @ weight.double().t()
    bound = sum_bound(x, weight) + (BF16_EPS if dtype is torch.bfloat16 else F32_EPS) * ref.abs()
    assert ((y.double() - ref).abs() <= bound).all() and ((compiled.double() - ref).abs() <= bound).all()


def test_matvec_linears_keep_their_parameters_and_the_eager_product():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2, bias=False))
    before = {name: p for name, p in model.named_parameters()}
    use_matvec_linears(model)
    assert all(type(m) is MatVecLinear for m in model)
    assert {name: p for name, p in model.named_parameters()} == before  # the same tensors under the same names
    x = torch.randn(1, 8)
    assert torch.equal(model[0](x), F.linear(x, model[0].weight, model[0].bias))  # eager: F.linear itself


def test_compiled_single_rows_are_fused_sums():
    """Inside a compiled graph one row goes through `matvec` (no library call in the generated code) and
    equals the eager layers within float32 sums; several rows keep the matrix product."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(64, 48), nn.SiLU(), nn.Linear(48, 64, bias=False)).eval()
    use_matvec_linears(layers)
    x = torch.randn(1, 1, 64)
    torch._dynamo.reset()
    compiled = torch.compile(layers, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        y, (code,) = run_and_get_code(compiled, x)
        hidden = layers[:2](x)
        eager = layers(x)
        rows = torch.randn(2, 3, 64)
        _, (rows_code,) = run_and_get_code(compiled, rows)
    assert not [call for call in LIBRARY_CALLS if call in code]
    assert "extern_kernels.addmm" in rows_code and "extern_kernels.mm" in rows_code
    # each side within the exact value by the first layer's rounding, carried through SiLU (slope below 1.1) and the
    # second layer, plus the second's own
    first = sum_bound(x, layers[0].weight)
    bound = 2 * (1.1 * first @ layers[2].weight.double().abs().t() + sum_bound(hidden, layers[2].weight))
    assert ((y.double() - eager.double()).abs() <= bound + F32_EPS * eager.double().abs()).all()


def single_row_outputs(engine: Engine, params: SamplingParams) -> list[list[int]]:
    return [engine.generate([prompt], params)[0] for prompt in PROMPTS]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "quantized"), [("llama", False), ("llama", True), ("gemma2", False)],
                         ids=["float32", "int8", "gemma2-softcap"])
def test_compiled_batch1_decoding_equals_eager(family, quantized, tmp_path):
    """Greedy batch-1 decoding with the compiled step (single-row products, attention written out) gives the eager
    engine's tokens: float32 and int8 weights (float32 activations, as in the eager engine), and Gemma 2's
    soft-capped attention. Its generated code calls no library for the float linear layers or SDPA (int8 layers keep
    torch's int8 kernel); the same batch size again compiles nothing new."""
    sharp_hf_model(family).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    fuse_projections(model)
    if quantized:
        Quantization("int8").apply(model, "float32")
    params = SamplingParams(max_new_tokens=20, temperature=0)
    eager = single_row_outputs(Engine(copy.deepcopy(model)), params)
    engine = Engine(model, compile=True)
    engine.native = None  # the torch.compile'd step, which decodes what the C step does not run (native_step.py)
    torch._dynamo.reset()
    with torch.inference_mode():
        logits, cache, pads = engine.prefill([PROMPTS[0]], 4)
        _, (code,) = run_and_get_code(engine.decode, logits.argmax(-1), pads, cache)
    assert not [call for call in LIBRARY_CALLS if call in code]
    assert ("_weight_int8pack_mm" in code) == quantized
    assert single_row_outputs(engine, params) == eager
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert single_row_outputs(engine, params) == eager
