"""Selective fine-tuning by name patterns and layer indices, and the `AdapterConfig` section."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.peft import AdapterConfig, PromptTuned, apply_method, parameter_counts, train_only

CONFIG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, qkv_bias=True)


def model() -> Transformer:
    m = Transformer(CONFIG)
    m.init_weights(seed=0)
    return m


def trainable(m: torch.nn.Module) -> set[str]:
    return {n for n, p in m.named_parameters() if p.requires_grad}


def test_norms_biases_and_last_layer():
    m = model()
    count = train_only(m, ["norms", "biases"], [-1])
    names = [n for n, _ in m.named_parameters()]
    norms = {n for n in names if n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))}
    norms.add("model.norm.weight")
    biases = {n for n in names if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    last = {n for n in names if n.startswith("model.layers.2.")}
    assert len(norms) == 7 and len(biases) == 9 and len(last) == 12
    assert trainable(m) == norms | biases | last
    assert count == sum(p.numel() for n, p in m.named_parameters() if n in norms | biases | last)
    assert parameter_counts(m) == (count, CONFIG.num_parameters())


def test_patterns_and_layer_indices():
    m = model()
    train_only(m, [r"mlp\.down_proj"], [0])
    assert trainable(m) == {n for n, _ in m.named_parameters() if n.startswith("model.layers.0.") or "down_proj" in n}
    train_only(m, ["head"])  # replaces the previous choice
    assert trainable(m) == {"lm_head.weight"}


def test_a_step_changes_only_the_chosen_parameters():
    m = model()
    train_only(m, ["embeddings"], [1])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 97, (2, 10))
    F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    optimizer.step()
    assert {n for n, p in m.named_parameters() if not torch.equal(p, before[n])} == trainable(m)


def test_tied_embeddings_train_under_either_name():
    cfg = CONFIG.model_copy(update={"tie_word_embeddings": True})
    m = Transformer(cfg)
    assert train_only(m, ["head"]) == 97 * 32
    assert m.model.embed_tokens.weight.requires_grad


def test_selection_errors():
    with pytest.raises(ValueError, match="'attn_gate' matches no parameter"):
        train_only(model(), ["norms", "attn_gate"])
    with pytest.raises(ValueError, match=r"layer indices \[3, -4\] out of range for a model of 3 layers"):
        train_only(model(), layers=[3, -4, 2])
    with pytest.raises(ValueError, match="invalid parameter pattern"):
        train_only(model(), ["norm("])
    with pytest.raises(ValueError, match="needs"):
        train_only(model())


def test_apply_method_full_selective_prompt():
    m = model()
    m.requires_grad_(False)
    assert trainable(apply_method(m, AdapterConfig())) == {n for n, _ in m.named_parameters()}
    m = apply_method(model(), AdapterConfig(method="selective", patterns=["norms"]))
    assert trainable(m) == {n for n, _ in m.named_parameters() if "norm" in n}
    prompted = apply_method(model(), AdapterConfig(method="prompt", num_virtual_tokens=4))
    assert isinstance(prompted, PromptTuned) and trainable(prompted) == {"prompt.weight"}
    with pytest.raises(ValueError, match="tokenizer"):
        apply_method(model(), AdapterConfig(method="prompt", prompt_init="text", prompt_init_text="hi"))


@pytest.mark.parametrize("fields, message", [
    (dict(method="selective"), "patterns and/or layers"),
    (dict(method="prompt", prompt_init="text"), "prompt_init_text"),
    (dict(method="lora", r=0), "r"),
    (dict(method="lora", targets=[]), "targets is empty"),
    (dict(method="lora", targets="some"), "targets"),
    (dict(method="dora"), "method"),
    (dict(rank=8), "rank"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        AdapterConfig(**fields)


def test_config_from_yaml_like_dict():
    cfg = AdapterConfig.model_validate({"method": "qlora", "r": 16, "alpha": 32, "targets": "all-linear"})
    assert (cfg.method, cfg.r, cfg.alpha, cfg.targets, cfg.dropout) == ("qlora", 16, 32.0, "all-linear", 0.0)
    assert AdapterConfig().targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
