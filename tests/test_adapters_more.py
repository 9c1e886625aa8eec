"""DoRA, rank/alpha patterns, modules_to_save and (IA)³ in PEFT's format, checked with PEFT itself:
lmforge-saved adapters load in `peft.PeftModel` with equal logits and PEFT-saved ones in lmforge,
merged models equal PEFT's `merge_and_unload`, and short `lmforge sft` runs of each method learn
and write adapters PEFT loads."""

import json

import peft
import pytest
import torch
import transformers as tf
from hf_models import VOCAB, tiny_hf_model
from safetensors.torch import load_file

from lmforge.checkpoint import load_model, save_model
from lmforge.peft import (
    AdapterConfig, add_lora, apply_method, disable_adapters, load_with_adapter, merge_and_save, merge_and_unload,
    save_adapter,
)

# On both sides: DoRA with per-module ranks/alphas and saved modules; (IA)³ with feed-forward modules.
OURS = {
    "dora": AdapterConfig(method="lora", r=2, alpha=4, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"],
                          use_dora=True, rank_pattern={"v_proj": 3, r"layers\.1\.self_attn\.q_proj": 5},
                          alpha_pattern={"q_proj": 7}, modules_to_save=["lm_head", "norm"]),
    "ia3": AdapterConfig(method="ia3", targets=["k_proj", "v_proj", "up_proj", "down_proj"],
                         feedforward_modules=["down_proj"], modules_to_save=["model.norm"]),
}
THEIRS = {
    "dora": peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                            use_dora=True, rank_pattern={"v_proj": 3, r"layers\.1\.self_attn\.q_proj": 5},
                            alpha_pattern={"q_proj": 7}, modules_to_save=["lm_head", "norm"], task_type="CAUSAL_LM"),
    "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                          feedforward_modules=["down_proj"], modules_to_save=["model.norm"], task_type="CAUSAL_LM"),
}


def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Adapter values away from their start: LoRA matrices, magnitudes and (IA)³ vectors, saved copies."""
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if "lora_A" in name or "lora_B" in name:
            p.copy_(noise * 0.2)
        elif "lora_magnitude_vector" in name or "ia3_l" in name or "modules_to_save" in name:
            p.mul_(1 + 0.2 * noise)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "llama"
    tiny_hf_model("llama", attention_bias=True).save_pretrained(path)  # biases: (IA)³ scales them too
    return path


def hf(base) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(base).eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return getattr(out, "logits", out)


@torch.no_grad()
def max_diff(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    x = ids()
    return (logits(ours, x) - logits(theirs, x)).abs().max().item()


@pytest.mark.parametrize("case", ["dora", "ia3"])
def test_lmforge_adapter_loads_in_peft(base, tmp_path, case):
    ours = apply_method(load_model(base), OURS[case]).eval()
    randomise(ours)
    out = save_adapter(ours, tmp_path / "adapter", base=base)
    config = json.loads((out / "adapter_config.json").read_text())
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert {"base_model.model.model.norm.weight"} <= keys
    if case == "dora":
        assert config["use_dora"] and config["r"] == 2 and config["lora_alpha"] == 4
        assert config["rank_pattern"] == {"model\\.layers\\.1\\.self_attn\\.q_proj": 5, "v_proj": 3}
        assert config["alpha_pattern"] == {"q_proj": 7}
        assert config["modules_to_save"] == ["input_layernorm", "lm_head", "norm", "post_attention_layernorm"]
        assert {"base_model.model.lm_head.weight", "base_model.model.model.layers.0.input_layernorm.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"} <= keys
    else:
        assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
        vector = load_file(out / "adapter_model.safetensors")["base_model.model.model.layers.0.mlp.down_proj.ia3_l"]
        assert vector.shape == (1, 64)
    theirs = peft.PeftModel.from_pretrained(hf(base), out).eval()
    assert max_diff(ours, theirs) < 1e-4
    with disable_adapters(ours), theirs.disable_adapter():
        assert max_diff(ours, theirs) < 1e-4
    assert max_diff(ours, hf(base)) > 1e-2  # the adapter matters
    if case == "dora":  # in training, the same dropout masks (one draw per layer, in the same order) as PEFT's
        ours.train(), theirs.train()
        torch.manual_seed(0)
        with torch.no_grad():
            train_ours = ours(ids())
        torch.manual_seed(0)
        with torch.no_grad():
            train_theirs = theirs(ids()).logits
        assert (train_ours - train_theirs).abs().max() < 1e-4
        assert (train_ours - logits(ours.eval(), ids())).abs().max() > 1e-3  # dropout was on
        theirs.eval()
    merged = hf(merge_and_save(out, tmp_path / "merged"))
    assert max_diff(merged, theirs.merge_and_unload()) < 1e-4


@pytest.mark.parametrize("case", ["dora", "ia3"])
def test_peft_adapter_loads_in_lmforge(base, tmp_path, case):
    theirs = peft.get_peft_model(hf(base), THEIRS[case])
    randomise(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    edit = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    edit["base_model_name_or_path"] = str(base)
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(edit))
    theirs.eval()
    ours = load_with_adapter(tmp_path / "theirs")
    assert max_diff(ours, theirs) < 1e-4
    merged = load_with_adapter(tmp_path / "theirs", merge=True)
    assert not any(k in n for n, _ in merged.named_parameters() for k in ("lora_", "ia3_l", "modules_to_save"))
    assert max_diff(merged, theirs.merge_and_unload()) < 1e-4


def test_dora_over_nf4_equals_peft_on_the_dequantised_base(base, tmp_path):
    """QLoRA with DoRA: the adapter, loaded by PEFT onto the NF4-rounded weights, gives the same logits."""
    rounded = merge_and_unload(add_lora(load_model(base), r=2, targets=["q_proj"], quantize=True))
    save_model(rounded, tmp_path / "rounded")
    ours = apply_method(load_model(base), AdapterConfig(method="qlora", r=2, alpha=4, dora=True,
                                                        targets="all-linear")).eval()
    randomise(ours)
    out = save_adapter(ours, tmp_path / "adapter", base=tmp_path / "rounded")
    theirs = peft.PeftModel.from_pretrained(hf(tmp_path / "rounded"), out).eval()
    assert max_diff(ours, theirs) < 1e-4
    with pytest.raises(ValueError, match="modules_to_save 'model.layers.0.mlp.down_proj' is stored in NF4"):
        apply_method(load_model(base), AdapterConfig(method="qlora", targets=["q_proj"], modules_to_save=["down_proj"]))


def test_recipe_errors(base):
    with pytest.raises(ValueError, match="dora goes with method lora or qlora, not 'ia3'"):
        AdapterConfig(method="ia3", dora=True)
    with pytest.raises(ValueError, match="feedforward_modules goes with method ia3"):
        AdapterConfig(method="lora", feedforward_modules=["down_proj"])
    assert AdapterConfig(method="ia3").targets == ["k_proj", "v_proj", "down_proj"]
    with pytest.raises(ValueError, match=r"feedforward_modules \['up_proj'\] are not among"):
        apply_method(load_model(base), AdapterConfig(method="ia3", feedforward_modules=["up_proj"]))
    with pytest.raises(ValueError, match="modules_to_save lm_hat matches no module"):
        apply_method(load_model(base), AdapterConfig(method="lora", modules_to_save=["lm_hat"]))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' holds an adapter"):
        apply_method(load_model(base), AdapterConfig(method="lora", modules_to_save=["q_proj"]))


# ---- training through `lmforge sft` ------------------------------------------------------------

TRAINED = {
    "dora": {"method": "lora", "r": 4, "alpha": 8, "dora": True, "targets": "all-linear", "dropout": 0.05,
             "rank_pattern": {"o_proj": 2}, "modules_to_save": ["model.norm"]},
    "ia3": {"method": "ia3", "targets": ["k_proj", "v_proj", "down_proj"]},
}


@pytest.mark.parametrize("case", ["dora", "ia3"])
def test_sft_trains_and_peft_loads_the_adapter(chat_base, tmp_path, case):
    from lmforge.cli import main
    from lmforge.generate.session import Session
    from lmforge.world.documents import write_instruction_data
    from lmforge.world.people import make_world

    data = write_instruction_data(make_world(0, n_people=20, n_companies=4), tmp_path / "qa.jsonl", "train")
    recipe = {"out_dir": str(tmp_path / "out"), "base": str(chat_base),
              "data": {"datasets": [{"path": str(data)}], "max_len": 64, "val_fraction": 0.2, "eval_batches": 1},
              "adapter": TRAINED[case],
              "train": {"steps": 6, "micro_batch_size": 8, "lr": 2e-2, "warmup_steps": 0, "log_every": 1,
                        "eval_every": 100, "save_every": 100, "peak_flops": 1e12}}
    (tmp_path / "sft.yaml").write_text(json.dumps(recipe))
    assert main(["sft", "--config", str(tmp_path / "sft.yaml")]) == 0
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < losses[0]
    adapter = tmp_path / "out" / "adapter"
    theirs = peft.PeftModel.from_pretrained(hf(chat_base), adapter).eval()
    session = Session.load(adapter)  # the base with the adapter merged in
    x = torch.tensor([session.tokenizer.encode("Where was Nora Yilmaz born?")])
    with torch.no_grad():
        expected = theirs(x).logits
        torch.testing.assert_close(load_with_adapter(adapter)(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(session.model(x), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(expected, hf(chat_base)(x).logits, atol=1e-3)
