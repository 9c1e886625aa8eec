"""LoRA layers: exact at init, merge/unmerge/disable round trips against weights merged by hand,
only the adapters train, and targets are checked."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.peft import (
    AdapterConfig, LoRALinear, add_lora, apply_method, disable_adapters, merge_and_unload, merge_lora,
    parameter_counts, trainable_parameters, unmerge_lora,
)
from lmforge.train.optim import build_optimizer

CONFIG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, attention_bias=True)
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


def base_model() -> Transformer:
    model = Transformer(CONFIG)
    model.init_weights(seed=0)
    with torch.no_grad():  # biases and norm gains away from 0/1 so they are checked too
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return model.eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def merged_by_hand(base: Transformer, lora: Transformer) -> Transformer:
    """The oracle: a copy of the base with W + (alpha / r) B A written into each adapted weight (float64)."""
    oracle = copy.deepcopy(base)
    weights = dict(oracle.named_parameters())
    with torch.no_grad():
        for name, m in lora.named_modules():
            if isinstance(m, LoRALinear):
                delta = m.lora_B.weight.double() @ m.lora_A.weight.double() * (m.alpha / m.r)
                weights[f"{name}.weight"].copy_(weights[f"{name}.weight"].double() + delta)
    return oracle


def test_lora_at_init_equals_the_base_exactly():
    base = base_model()
    lora = add_lora(copy.deepcopy(base), r=4, alpha=8, targets="all-linear")
    assert sum(isinstance(m, LoRALinear) for m in lora.modules()) == 2 * 7
    with torch.no_grad():
        assert torch.equal(lora(ids()), base(ids()))
    for m in lora.modules():
        if isinstance(m, LoRALinear):
            assert torch.count_nonzero(m.lora_B.weight) == 0
            bound = 1 / m.in_features**0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 3


def test_lora_forward_merge_unmerge_and_disable():
    base = base_model()
    lora = add_lora(copy.deepcopy(base), r=4, alpha=8)
    randomise_adapters(lora)
    original = {k: v.clone() for k, v in lora.state_dict().items()}
    x = ids()
    with torch.no_grad():
        expected = merged_by_hand(base, lora)(x)
        unmerged = lora(x)
        assert (unmerged - expected).abs().max() < 1e-5
        assert (unmerged - base(x)).abs().max() > 0.1  # the adapters matter

        with disable_adapters(lora):
            assert torch.equal(lora(x), base(x))
        assert torch.equal(lora(x), unmerged)  # re-enabled on exit

        merge_lora(lora)
        assert all(m.merged for m in lora.modules() if isinstance(m, LoRALinear))
        assert (lora(x) - unmerged).abs().max() < 1e-5
        q = "model.layers.0.self_attn.q_proj.weight"
        assert (lora.state_dict()[q] - original[q]).abs().max() > 0.01  # the weight itself holds the update
        with disable_adapters(lora):  # merged and disabled: the update is taken back out on the fly
            assert (lora(x) - base(x)).abs().max() < 1e-5

        unmerge_lora(lora)
        for name, value in lora.state_dict().items():
            assert torch.allclose(value, original[name], atol=1e-6, rtol=0), name
        assert (lora(x) - unmerged).abs().max() < 1e-5


def test_merge_and_unload_gives_a_plain_model():
    base = base_model()
    lora = add_lora(copy.deepcopy(base), r=4, alpha=16, targets=["v_proj", "down_proj"])
    randomise_adapters(lora)
    x = ids()
    with torch.no_grad():
        adapted = lora(x)
        plain = merge_and_unload(lora)
        assert not any(isinstance(m, LoRALinear) for m in plain.modules())
        assert set(plain.state_dict()) == set(base.state_dict())
        assert (plain(x) - adapted).abs().max() < 1e-5


def test_one_optimizer_step_changes_only_the_adapters():
    base = base_model()
    lora = add_lora(copy.deepcopy(base), r=4, alpha=8, targets=["q_proj", "v_proj"])
    randomise_adapters(lora)
    adapters = {n for n, _ in lora.named_parameters() if "lora_" in n}
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == adapters
    assert len(adapters) == 2 * 2 * 2
    assert trainable_parameters(lora) == [p for n, p in lora.named_parameters() if n in adapters]
    trainable, total = parameter_counts(lora)
    assert trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)  # layers x (A_q + B_q + A_v + B_v)
    assert total == CONFIG.num_parameters() + trainable

    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    optimizer = build_optimizer(lora, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    lora.train()
    x = ids()
    F.cross_entropy(lora(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    optimizer.step()
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, before[n])}
    assert changed == adapters
    held = {id(p) for p in optimizer.state}
    assert held == {id(p) for n, p in lora.named_parameters() if n in adapters}
    assert all(p.grad is None for n, p in lora.named_parameters() if n not in adapters)


def test_dropout_applies_to_the_adapter_input_only():
    lora = add_lora(base_model(), r=4, alpha=8, dropout=0.5, targets=["q_proj"])
    layer = lora.model.layers[0].self_attn.q_proj
    assert not layer.training  # new layers follow the model's mode
    randomise_adapters(lora)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        layer.train()
        torch.manual_seed(7)
        got = layer(x)
        torch.manual_seed(7)
        dropped = F.dropout(x.reshape(-1, 32), 0.5, training=True).reshape(x.shape)
        want = F.linear(x, layer.weight, layer.bias) + dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2
        assert (got - want).abs().max() < 1e-5
        layer.eval()
        full = F.linear(x, layer.weight, layer.bias) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2
        assert (layer(x) - full).abs().max() < 1e-5


def test_bf16_autocast_forward_and_backward():
    lora = add_lora(base_model(), r=4, alpha=8)
    randomise_adapters(lora)
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lora(x)
    assert logits.dtype == torch.bfloat16
    with torch.no_grad():
        assert (logits.float() - lora(x)).abs().max() < 0.25  # bf16 rounding only
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable_parameters(lora))


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match=r"qkv_proj not found.*q_proj"):
        add_lora(base_model(), targets=["q_proj", "qkv_proj"])
    model = add_lora(base_model())
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)


def test_apply_method_lora_from_config():
    cfg = AdapterConfig(method="lora", r=2, alpha=4, targets=["gate_proj", "up_proj"], seed=3)
    a, b = apply_method(base_model(), cfg), apply_method(base_model(), cfg)
    layers = {n.rsplit(".", 1)[-1] for n, m in a.named_modules() if isinstance(m, LoRALinear)}
    assert layers == {"gate_proj", "up_proj"}
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # seeded: the same adapters twice
    assert a.model.layers[0].mlp.up_proj.scaling == 2.0
