"""The C decode step (`lmforge.generate.native_step`): its logits against transformers' for every family it runs and
for each instruction set it is built for, bfloat16 and int8 weights against float32 models of the same rounded
weights, any thread count against one, the compiled engine's greedy tokens against the eager engine's, and what it
refuses."""

import copy

import pytest
import torch
from conftest import sharp_hf_model
from torch import nn

from lmforge.checkpoint import load_model
from lmforge.generate.engine import Engine
from lmforge.generate.native_step import NativeStep, library, native_step, unsupported
from lmforge.generate.quantize import Int8Linear, Quantization
from lmforge.generate.sampling import SamplingParams
from lmforge.kv_cache import KVCache, StaticKVCache
from lmforge.model import fuse_projections

# float32 sums of at most a few hundred terms through two layers: ~1e-6 measured on logits of magnitude ~2 (sharp
# models), against unit roundoff 6e-8; a wrong RoPE, mask or norm moves them by ~1 (conftest.sharp_hf_model)
ATOL = 1e-5
PREFIX, LENGTH = 4, 40
SUPPORTED = ["llama", "llama3-smooth", "llama-bias", "mistral", "qwen2", "qwen2-sliding", "qwen3", "gemma", "phi3"]
REFUSED = {"gemma2": "norms after attention and MLP", "gemma3": "a second RoPE table for sliding layers",
           "mixtral": "an MLP other than a gated one", "falcon": "LayerNorm", "gpt2": "positions other than RoPE"}


def token_ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, LENGTH), generator=torch.Generator().manual_seed(0))


def step_logits(model: nn.Module, ids: torch.Tensor, step: NativeStep | None = None,
                cache_dtype: torch.dtype = torch.float32, prefill: bool = True) -> torch.Tensor:
    """Logits at positions PREFIX..LENGTH-1: the first PREFIX tokens prefilled by the model (`prefill`, as the engine
    does) or fed through the C step too, then one C step each."""
    step = step or NativeStep(model)
    with torch.inference_mode():
        cache = StaticKVCache(model.config, 1, LENGTH + 8, dtype=cache_dtype, device="cpu")
        if prefill:
            model(ids[:, :PREFIX], cache=cache)
        else:
            for token in ids[0, :PREFIX]:
                step(int(token), cache)
        return torch.cat([step(int(token), cache) for token in ids[0, PREFIX:]])


def hf_and_lmforge(family: str, tmp_path, **overrides) -> tuple[nn.Module, nn.Module]:
    """A sharp transformers model of `family` and lmforge's load of it."""
    hf = sharp_hf_model(family, **overrides)
    hf.save_pretrained(tmp_path)
    return hf, load_model(tmp_path)


def hf_logits(hf: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(ids).logits[0, PREFIX:]


@pytest.mark.parametrize("family", SUPPORTED)
def test_logits_equal_transformers(family, tmp_path):
    """Each step's logits are transformers' for the same tokens, fused projections or not."""
    hf, model = hf_and_lmforge(family, tmp_path)
    assert unsupported(model) is None
    ids = token_ids(hf.config.vocab_size)
    want = hf_logits(hf, ids)
    assert (step_logits(model, ids) - want).abs().max() < ATOL
    fuse_projections(model)
    assert (step_logits(model, ids) - want).abs().max() < ATOL


@pytest.mark.parametrize("arch", ["native", "x86-64-v3", "x86-64"], ids=["native", "avx2", "no-simd"])
def test_each_instruction_set(arch, tmp_path):
    """Built for AVX-512 (where the CPU has it), AVX2 and plain x86-64, at sizes that leave every loop a tail
    (hidden 72, MLP 200, heads of 12): the same logits as transformers."""
    hf, model = hf_and_lmforge("llama-bias", tmp_path, hidden_size=72, intermediate_size=200, num_attention_heads=6)
    ids = token_ids(hf.config.vocab_size)
    got = step_logits(model, ids, NativeStep(model, library(arch)))
    assert (got - hf_logits(hf, ids)).abs().max() < ATOL


def test_any_thread_count_gives_the_same_logits(tmp_path):
    """Each output row is one thread's whole dot product, so splitting the rows differently changes nothing."""
    _, model = hf_and_lmforge("qwen2", tmp_path)
    ids = token_ids(model.config.vocab_size)
    one = step_logits(model, ids)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert torch.equal(step_logits(model, ids), one)
    finally:
        torch.set_num_threads(threads)


def eager_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The eager lmforge model's logits at the stepped positions (one full forward pass)."""
    with torch.inference_mode():
        return model(ids)[0, PREFIX:]


def test_bfloat16_weights(tmp_path):
    """bfloat16 weights with float32 activations: the float32 model of the same rounded weights. A bfloat16 cache
    (the engine's for a bfloat16 model, prefilled by the bfloat16 model) adds the rounding of keys and values
    (relative 2^-9) and of the prefill's activations: measured 1.6e-3 and 2.5e-3 of the largest logit, allowed 2^-7."""
    _, model = hf_and_lmforge("qwen2", tmp_path)
    ids = token_ids(model.config.vocab_size)
    model.to(torch.bfloat16)
    want = eager_logits(copy.deepcopy(model).float(), ids)  # the same rounded weights (and RoPE frequencies)
    assert (step_logits(model, ids, prefill=False) - want).abs().max() < ATOL
    for prefill in (False, True):
        bf16_cache = step_logits(model, ids, cache_dtype=torch.bfloat16, prefill=prefill)
        assert (bf16_cache - want).abs().max() < 2.0**-7 * want.abs().max()


def dequantized(model: nn.Module) -> nn.Module:
    """A float32 copy with every `Int8Linear` a plain linear of weight q * scale."""
    dense = copy.deepcopy(model).float()
    for parent in list(dense.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = child.qweight.float() * child.scale.float()[:, None]
                if child.bias is not None:
                    linear.bias.data = child.bias.float()
                setattr(parent, name, linear)
    return dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weights(dtype, tmp_path):
    """int8 weights, one scale per row (float32 or bfloat16 scales): the float32 model of weights q * scale."""
    _, model = hf_and_lmforge("llama-bias", tmp_path)
    fuse_projections(model)
    Quantization("int8").apply(model, dtype)
    assert unsupported(model) is None
    ids = token_ids(model.config.vocab_size)
    want = eager_logits(dequantized(model), ids)
    assert (step_logits(model, ids, prefill=False) - want).abs().max() < ATOL


def test_compiled_engine_decodes_one_sequence_in_c_with_the_eager_tokens(tmp_path):
    """`Engine(compile=True)` decodes a single sequence through the C step: greedy tokens equal the eager engine's."""
    _, model = hf_and_lmforge("qwen3", tmp_path)
    params = SamplingParams(max_new_tokens=30, temperature=0)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]]
    eager = [Engine(copy.deepcopy(model)).generate([p], params)[0] for p in prompts]
    engine = Engine(model, compile=True)
    assert engine.native is not None
    assert [engine.generate([p], params)[0] for p in prompts] == eager
    assert all(len(tokens) == 30 for tokens in eager)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refuses_what_it_does_not_run(family, tmp_path):
    """Families the C step does not implement are named with the reason; their compiled engine keeps torch.compile."""
    _, model = hf_and_lmforge(family, tmp_path)
    assert REFUSED[family] in unsupported(model)
    with pytest.raises(ValueError, match=REFUSED[family]):
        NativeStep(model)
    assert Engine(model, compile=True).native is None


def test_refuses_tokens_and_caches_it_cannot_take(tmp_path):
    _, model = hf_and_lmforge("llama", tmp_path)
    step = NativeStep(model)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="StaticKVCache of one sequence"):
            step(5, KVCache(model.config, 1, 16, dtype=torch.float32, device="cpu"))
        with pytest.raises(ValueError, match="StaticKVCache of one sequence"):
            step(5, StaticKVCache(model.config, 2, 16, dtype=torch.float32, device="cpu"))
        with pytest.raises(ValueError, match="token id 97 is outside the vocabulary of 97"):
            step(97, StaticKVCache(model.config, 1, 16, dtype=torch.float32, device="cpu"))
        full = StaticKVCache(model.config, 1, 5, dtype=torch.float32, device="cpu")
        model(torch.tensor([[5, 6, 7, 8]]), cache=full)
        step(9, full)
        with pytest.raises(ValueError, match="KV cache is full: 6 tokens exceed its 5 slots"):
            step(10, full)
        assert int(full.length) == 5


def test_without_a_compiler_the_engine_keeps_torch_compile(tmp_path, monkeypatch):
    _, model = hf_and_lmforge("llama", tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="decoding through torch.compile instead: no C compiler"):
            assert native_step(model) is None
    finally:
        library.cache_clear()
