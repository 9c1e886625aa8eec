"""QLoRA: NF4 base weights (torchao), LoRA on top; checked against a dense model holding the
dequantised weights, for logits and gradients, plus storage size and a small memorisation task."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import NF4Tensor

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.peft import AdapterConfig, FrozenLinear, LoRALinear, apply_method, merge_and_unload, merge_lora
from lmforge.peft.lora import nf4_nbytes

CONFIG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
QLORA = AdapterConfig(method="qlora", r=8, alpha=16, targets="all-linear")
GELU = dict(norm="layernorm", mlp="gelu", attention_bias=True, mlp_bias=True)
FAMILIES = {  # the other families' distinguishing features, at a size NF4's 64-value blocks divide
    "llama": CONFIG,
    "gemma2": CONFIG.model_copy(update=dict(
        family="gemma2", head_dim=16, hidden_act="gelu_pytorch_tanh", norm_offset=True, scale_embeddings=True,
        post_norms=True, query_pre_attn_scalar=12, attn_logit_softcapping=20.0, final_logit_softcapping=10.0)),
    "qwen3": CONFIG.model_copy(update=dict(family="qwen3", qk_norm=True)),
    "phi3": CONFIG.model_copy(update=dict(family="phi3", partial_rotary_factor=0.5)),
    "falcon": CONFIG.model_copy(update=dict(family="falcon", parallel_residual=True, gelu_approximate="none", **GELU)),
    "bloom": CONFIG.model_copy(update=dict(family="bloom", position="alibi", embedding_norm=True, **GELU)),
}


def base_model(dtype: torch.dtype = torch.float32, config: ModelConfig = CONFIG) -> Transformer:
    model = Transformer(config)
    model.init_weights(seed=0)
    return model.to(dtype).eval()


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, FrozenLinear))
            and n.startswith("model.layers.") and ".lora_" not in n}


def dequantised_oracle(base: Transformer, qlora: Transformer) -> Transformer:
    """A dense copy of the base holding each NF4 weight dequantised by torchao, plus the same adapters
    merged by hand (float64)."""
    oracle = copy.deepcopy(base)
    weights = dict(oracle.named_parameters())
    with torch.no_grad():
        for name, m in block_linears(qlora).items():
            w = m.weight.get_original_weight().double()
            if isinstance(m, LoRALinear):
                w = w + m.lora_B.weight.double() @ m.lora_A.weight.double() * m.scaling
            weights[f"{name}.weight"].copy_(w)
    return oracle


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def test_base_weights_are_nf4_and_take_under_35_percent_of_bf16():
    model = apply_method(base_model(), QLORA)
    linears = block_linears(model)
    assert len(linears) == 2 * 7
    assert all(isinstance(m.weight, NF4Tensor) and not m.weight.requires_grad for m in linears.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}.weight" for n in linears for ab in "AB"}
    nf4 = sum(nf4_nbytes(m.weight) for m in linears.values())
    bf16 = sum(m.weight.numel() * 2 for m in linears.values())
    assert nf4 < 0.35 * bf16, (nf4, bf16)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_logits_and_gradients_match_the_dequantised_dense_model(family):
    base = base_model(config=ModelConfig.model_validate(FAMILIES[family].model_dump()))
    cfg = AdapterConfig(method="qlora", r=4, alpha=8, targets=["q_proj", "down_proj"])
    qlora = apply_method(copy.deepcopy(base), cfg)
    assert isinstance(qlora.model.layers[0].mlp.up_proj.weight, NF4Tensor)  # quantised although not a target
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    oracle = dequantised_oracle(base, qlora)
    x = ids()
    with torch.no_grad():
        assert (qlora(x) - oracle(x)).abs().max() < 1e-4
        assert (qlora(x) - base(x)).abs().max() > 1e-3  # NF4 is lossy: the oracle is not the base

    # Gradients of the adapters flow through the dequantised base; check them against the dense
    # model whose merged weight W + s B A gets dL/dW, so dL/dA = s B^T dL/dW and dL/dB = s dL/dW A^T.
    loss = F.cross_entropy(qlora(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    oracle.requires_grad_(True)
    F.cross_entropy(oracle(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    dense = dict(oracle.named_parameters())
    for name, m in qlora.named_modules():
        if isinstance(m, LoRALinear):
            g = dense[f"{name}.weight"].grad
            assert torch.allclose(m.lora_A.weight.grad, m.scaling * m.lora_B.weight.T @ g, atol=1e-5)
            assert torch.allclose(m.lora_B.weight.grad, m.scaling * g @ m.lora_A.weight.T, atol=1e-5)


def test_loss_falls_memorising_a_sequence():
    torch.manual_seed(0)
    model = apply_method(base_model(), QLORA)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    seq = torch.randint(0, 128, (1, 17), generator=torch.Generator().manual_seed(1))
    model.train()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(seq[:, :-1])[0], seq[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    assert set(map(id, optimizer.state)) == set(map(id, params))


def test_bf16_base_and_merge_rules():
    model = apply_method(base_model(torch.bfloat16), QLORA)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.bfloat16
    x = ids()
    logits = model(x)
    logits.float().sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.grad is not None
    with pytest.raises(ValueError, match="NF4"):
        merge_lora(model)
    with torch.no_grad():
        plain = merge_and_unload(model)  # dequantised and merged into a dense bf16 model
        linears = block_linears(plain).values()
        assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
        assert torch.equal(plain(x), logits.detach())  # B is still 0: the dense weights are the dequantised ones


def test_weights_nf4_cannot_hold_are_refused():
    cfg = CONFIG.model_copy(update={"hidden_size": 40, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "head_dim": 10})
    model = Transformer(cfg)
    with pytest.raises(ValueError, match=r"self_attn.k_proj: NF4 needs a weight size divisible by 64, got shape \(20"):
        apply_method(model, QLORA)
