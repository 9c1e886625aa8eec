"""PEFT adapters for the families whose weights are fused on disk (Phi-3's qkv_proj and gate_up_proj,
Falcon's and BLOOM's query_key_value) and the other new families, checked with PEFT itself: PEFT-written
adapters load in lmforge with PEFT's logits (and save back unchanged), lmforge-saved ones (all layers,
or some parts of a fused module) load in `peft.PeftModel` with equal logits, resume into per-part
layers, and merge as PEFT's `merge_and_unload` does."""

import json

import peft
import pytest
import torch
import transformers as tf
from conftest import sharp_hf_model
from hf_models import VOCAB
from safetensors.torch import load_file

from lmforge.checkpoint import load_model
from lmforge.peft import add_lora, adapter_state, load_adapter, load_with_adapter, merge_and_save, save_adapter
from lmforge.peft.ia3 import add_ia3

FAMILIES = ["phi3", "phi3-longrope", "falcon", "falcon-new", "bloom", "gemma", "gemma2", "gemma3", "qwen3"]
# Qwen3-MoE's experts are one 3-D parameter in transformers' model (PEFT targets them as target_parameters):
# only its attention is checked here.
CASES = [(f, t) for f in FAMILIES for t in ("all-linear", ["q_proj", "v_proj"])] + [("qwen3_moe", ["q_proj", "v_proj"])]
FUSED = {"phi3": ["qkv_proj", "gate_up_proj"], "falcon": ["query_key_value"], "falcon-new": ["query_key_value"],
         "bloom": ["query_key_value"], "phi3-longrope": ["qkv_proj", "gate_up_proj"]}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Factory: the sharpened tiny transformers model of a family, saved once per module."""
    root, made = tmp_path_factory.mktemp("bases"), {}

    def make(family: str):
        if family not in made:
            made[family] = root / family
            sharp_hf_model(family).save_pretrained(made[family])
        return made[family]

    return make


def hf(base) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(x)
    return getattr(out, "logits", out)


def close(ours: torch.nn.Module, theirs: torch.nn.Module, base: torch.nn.Module | None = None) -> None:
    a, b = logits(ours), logits(theirs)
    assert (a - b).abs().max().item() < TOLERANCE
    if base is not None:
        assert (a - logits(base)).abs().max().item() > 1e-2  # the adapter matters


@torch.no_grad()
def randomise(model: torch.nn.Module, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if "lora_A" in name or "lora_B" in name:
            p.copy_(noise * scale)
        elif "lora_magnitude_vector" in name or "ia3_l" in name or "modules_to_save" in name:
            p.mul_(1 + 0.2 * noise)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_loads_in_lmforge_and_saves_back_unchanged(bases, tmp_path, family):
    base = bases(family)
    theirs = peft.get_peft_model(hf(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(FUSED.get(family, [])) <= {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    config["base_model_name_or_path"] = str(base)
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(config))
    ours = load_with_adapter(tmp_path / "theirs")
    close(ours, theirs.eval(), load_model(base))
    save_adapter(ours, tmp_path / "back", base=base)  # equal A per part: PEFT's own form again
    written, again = load_file(tmp_path / "theirs" / "adapter_model.safetensors"), load_file(
        tmp_path / "back" / "adapter_model.safetensors")
    assert written.keys() == again.keys() and all(torch.equal(written[k], again[k]) for k in written)


@pytest.mark.parametrize("family, targets", CASES)
def test_lmforge_lora_loads_in_peft_resumes_and_merges(bases, tmp_path, family, targets):
    base = bases(family)
    ours = add_lora(load_model(base), r=4, alpha=8, targets=targets, rank_pattern={"v_proj": 2})
    randomise(ours)
    out = save_adapter(ours, tmp_path / "ours", base=base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert ("q_proj" in config["target_modules"]) == (family not in FUSED)  # on-disk names only
    theirs = peft.PeftModel.from_pretrained(hf(base), out).eval()
    close(ours, theirs, load_model(base))

    resumed = load_adapter(add_lora(load_model(base), r=4, alpha=8, targets=targets, rank_pattern={"v_proj": 2}), out)
    before, after = adapter_state(ours), adapter_state(resumed)
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], atol=1e-7) for k in before)

    merged = tf.AutoModelForCausalLM.from_pretrained(merge_and_save(out, tmp_path / "merged")).eval()
    close(merged, theirs.merge_and_unload())


@pytest.mark.parametrize("family, targets", [("phi3", ["k_proj", "gate_proj", "o_proj"]),
                                             ("bloom", ["k_proj", "up_proj"])])
def test_dora_both_ways(bases, tmp_path, family, targets):
    base = bases(family)
    ours = add_lora(load_model(base), r=2, alpha=4, targets=targets, dora=True)
    randomise(ours)
    theirs = peft.PeftModel.from_pretrained(hf(base), save_adapter(ours, tmp_path / "ours", base=base)).eval()
    close(ours, theirs, load_model(base))

    theirs = peft.get_peft_model(hf(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                                           use_dora=True))
    randomise(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    close(load_adapter(load_model(base), tmp_path / "theirs"), theirs.eval())


@pytest.mark.parametrize("family, down, norm", [("phi3", "down_proj", "norm"), ("bloom", "dense_4h_to_h", "ln_f")])
def test_ia3_both_ways(bases, tmp_path, family, down, norm):
    base = bases(family)
    ia3 = dict(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])
    ours = add_ia3(load_model(base), **ia3)
    randomise(ours)
    out = save_adapter(ours, tmp_path / "ours", base=base)
    theirs = peft.PeftModel.from_pretrained(hf(base), out).eval()
    close(ours, theirs, load_model(base))
    resumed = adapter_state(load_adapter(add_ia3(load_model(base), **ia3), out))
    assert all(torch.equal(value, resumed[key]) for key, value in adapter_state(ours).items())
    merged = tf.AutoModelForCausalLM.from_pretrained(merge_and_save(out, tmp_path / "merged")).eval()
    close(merged, theirs.merge_and_unload())

    fused = FUSED[family][0]  # input scaling of the fused module: one vector for all its parts
    theirs = peft.get_peft_model(hf(base), peft.IA3Config(target_modules=[fused, down], feedforward_modules=[fused],
                                                          modules_to_save=[norm]))
    randomise(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    close(load_adapter(load_model(base), tmp_path / "theirs"), theirs.eval())


def test_feedforward_ia3_on_some_parts_of_a_fused_module_is_refused(bases, tmp_path):
    model = add_ia3(load_model(bases("phi3")), targets=["gate_proj"], feedforward=["gate_proj"])
    with pytest.raises(ValueError, match="gate_up_proj.*gate_proj, up_proj"):
        save_adapter(model, tmp_path / "a", base=bases("phi3"))
