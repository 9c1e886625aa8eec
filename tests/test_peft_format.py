"""Adapters in PEFT's format, checked with PEFT itself: lmforge-saved adapters load with
`peft.PeftModel.from_pretrained` on the transformers model (and PEFT-saved ones in lmforge) with
equal logits; `merge_and_save` output loads in transformers; clear errors for bad directories."""

import json

import peft
import pytest
import torch
import transformers as tf
from hf_models import VOCAB, tiny_hf_model
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import load_model
from lmforge.peft import (
    AdapterConfig, add_lora, add_trainable_tokens, apply_method, disable_adapters, is_adapter_dir, load_adapter,
    load_with_adapter, merge_and_save, prompt_tuning, save_adapter, trainable_parameters,
)
from lmforge.peft.tokens import input_and_output


def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


def randomise_adapters(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@pytest.fixture
def base_dir(tmp_path):
    """Factory: a tiny transformers model of `family` saved to a directory (with a tokenizer file)."""

    def make(family: str = "llama", **overrides):
        path = tmp_path / f"base-{family}"
        tiny_hf_model(family, **overrides).save_pretrained(path)
        (path / "tokenizer.json").write_text('{"stand-in": true}')
        return path

    return make


def peft_model(base, adapter) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter).eval()


@torch.no_grad()
def max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, skip: int = 0) -> float:
    x = ids()
    return (ours(x) - theirs(x).logits[:, skip:]).abs().max().item()


@pytest.mark.parametrize("family, targets", [("llama", ["q_proj", "v_proj"]), ("qwen2", "all-linear"),
                                             ("mistral", ["o_proj", "gate_proj"]), ("gemma2", "all-linear"),
                                             ("qwen3", ["q_proj", "k_proj", "down_proj"])])
def test_lmforge_lora_loads_in_peft(base_dir, tmp_path, family, targets):
    base = base_dir(family)
    model = add_lora(load_model(base), r=4, alpha=8, dropout=0.05, targets=targets)
    randomise_adapters(model)
    out = save_adapter(model, tmp_path / "adapter", base=base)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys or targets != ["q_proj", "v_proj"]
    theirs = peft_model(base, out)
    assert max_diff(model, theirs) < 1e-4
    with disable_adapters(model), theirs.disable_adapter():
        assert max_diff(model, theirs) < 1e-4
    assert max_diff(model, tf.AutoModelForCausalLM.from_pretrained(base)) > 1e-2  # the adapters matter


def test_adapter_config_is_peft_config(base_dir, tmp_path):
    """Every field written is one of PEFT's LoraConfig, with the value PEFT writes for these settings."""
    base = base_dir()
    model = add_lora(load_model(base), r=4, alpha=8, dropout=0.1, targets=["q_proj", "k_proj"], rslora=True)
    config = json.loads((save_adapter(model, tmp_path / "a", base=base) / "adapter_config.json").read_text())
    reference = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "k_proj"],
                                use_rslora=True, task_type="CAUSAL_LM", base_model_name_or_path=str(base),
                                inference_mode=True).to_dict()
    reference["target_modules"] = sorted(reference["target_modules"])
    assert config.keys() <= reference.keys()
    assert {k: reference[k] for k in config} == config
    assert peft.PeftConfig.from_pretrained(tmp_path / "a").peft_type == "LORA"


@pytest.mark.parametrize("rslora, task_type", [(False, "CAUSAL_LM"), (True, "CAUSAL_LM"), (False, None)])
def test_peft_lora_loads_in_lmforge(base_dir, tmp_path, rslora, task_type):
    """Also an adapter from a LoraConfig without a task type (peft's default: `task_type: null`)."""
    base = base_dir()
    hf = tf.AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear", use_rslora=rslora, task_type=task_type,
                             base_model_name_or_path=str(base))
    theirs = peft.get_peft_model(hf, config)
    randomise_adapters(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["task_type"] == task_type
    ours = load_with_adapter(tmp_path / "theirs")
    assert max_diff(ours, theirs.eval()) < 1e-4
    merged = load_with_adapter(tmp_path / "theirs", merge=True)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert max_diff(merged, theirs) < 1e-4


TOKENS = [3, 5, 40]  # ids() draws from [3, VOCAB): the trained rows are read and scored


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied, tied embeddings
def test_trainable_tokens_load_in_peft(base_dir, tmp_path, family):
    base = base_dir(family)
    model = add_lora(load_model(base), r=4, alpha=8, targets="all-linear")
    add_trainable_tokens(model, input_and_output(model, TOKENS))
    randomise_adapters(model)
    tied = family == "qwen2"
    out = save_adapter(model, tmp_path / "adapter", base=base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == (TOKENS if tied else {"embed_tokens": TOKENS, "lm_head": TOKENS})
    rows = {k for k in load_file(out / "adapter_model.safetensors") if "token_adapter" in k}
    assert rows == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"} | (
        set() if tied else {"base_model.model.lm_head.token_adapter.trainable_tokens_delta"})
    theirs = peft_model(base, out)
    assert max_diff(model, theirs) < 1e-4
    with disable_adapters(model), theirs.disable_adapter():
        assert max_diff(model, theirs) < 1e-4
    merged = tf.AutoModelForCausalLM.from_pretrained(merge_and_save(out, tmp_path / "merged")).eval()
    assert max_diff(model, merged) < 1e-4
    assert max_diff(load_with_adapter(out), theirs) < 1e-4  # and back


def test_peft_trainable_tokens_load_in_lmforge(base_dir, tmp_path):
    base = base_dir()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                             trainable_token_indices={"embed_tokens": [4, 9], "lm_head": [9, 11, 12]},
                             base_model_name_or_path=str(base))
    theirs = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base), config)
    randomise_adapters(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    assert max_diff(load_with_adapter(tmp_path / "theirs"), theirs.eval()) < 1e-4
    merged = load_with_adapter(tmp_path / "theirs", merge=True)
    assert not any("token_adapter" in n or "lora_" in n for n, _ in merged.named_parameters())
    assert max_diff(merged, theirs) < 1e-4


class Vocabulary:
    def token_to_id(self, token: str) -> int | None:
        return {"<|im_start|>": 3, "<|im_end|>": 5}.get(token)


def test_only_the_chosen_rows_train(base_dir):
    base = base_dir()
    model = apply_method(load_model(base), AdapterConfig(method="lora", r=2, trainable_tokens=["<|im_end|>", 40]),
                         Vocabulary())
    hidden = model.config.hidden_size
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in trainable_parameters(model)) == lora + 2 * 2 * hidden  # two rows, in and out
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids()
    x[0, :4] = torch.tensor([5, 40, 5, 7])
    torch.optim.SGD(trainable_parameters(model), lr=1.0).zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    torch.optim.SGD(trainable_parameters(model), lr=1.0).step()
    embed = model.model.embed_tokens
    assert torch.equal(embed.weight, before["model.embed_tokens.weight"])  # the base rows stay frozen
    assert not torch.equal(embed.rows, before["model.embed_tokens.token_adapter.trainable_tokens_delta"])
    assert not torch.equal(model.lm_head.rows, before["lm_head.token_adapter.trainable_tokens_delta"])
    with pytest.raises(ValueError, match="not one token"):
        apply_method(load_model(base), AdapterConfig(method="lora", trainable_tokens=["<|eot|>"]), Vocabulary())
    with pytest.raises(ValueError, match="trainable_tokens goes with method lora"):
        AdapterConfig(method="full", trainable_tokens=[3])


def test_prompt_tuning_both_ways(base_dir, tmp_path):
    base = base_dir()
    ours = prompt_tuning(load_model(base), 6, "vocab", generator=torch.Generator().manual_seed(0))
    out = save_adapter(ours, tmp_path / "prompt", base=base)
    assert set(load_file(out / "adapter_model.safetensors")) == {"prompt_embeddings"}
    theirs = peft_model(base, out)
    assert max_diff(ours, theirs, skip=6) < 1e-4  # PEFT scores the virtual positions too
    with pytest.raises(ValueError, match="PROMPT_TUNING adapter has no weights to merge"):
        merge_and_save(out, tmp_path / "merged")

    hf = tf.AutoModelForCausalLM.from_pretrained(base)
    theirs = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                             base_model_name_or_path=str(base)))
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_with_adapter(tmp_path / "theirs", merge=True)  # a soft prompt stays a wrapper
    assert loaded.num_virtual_tokens == 3
    assert max_diff(loaded, theirs.eval(), skip=3) < 1e-4


def test_merge_and_save_loads_in_transformers(base_dir, tmp_path):
    base = base_dir("qwen2")
    model = add_lora(load_model(base), r=4, alpha=8, targets="all-linear")
    randomise_adapters(model)
    adapter = save_adapter(model, tmp_path / "runs" / "adapter", base=base)
    out = merge_and_save(adapter, tmp_path / "merged")
    assert (out / "tokenizer.json").read_text() == '{"stand-in": true}'
    merged = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(model, merged) < 1e-4
    assert max_diff(load_model(out), merged) < 1e-4


def test_base_path_relative_to_the_adapter_dir(base_dir, tmp_path):
    base = base_dir()
    model = add_lora(load_model(base), r=2, alpha=2)
    randomise_adapters(model)
    adapter = save_adapter(model, tmp_path / "adapter", base=base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    config["base_model_name_or_path"] = f"../{base.name}"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert is_adapter_dir(adapter) and not is_adapter_dir(base)
    assert max_diff(load_with_adapter(adapter), peft_model(base, adapter)) < 1e-4


def test_saving_replaces_the_directory_atomically(base_dir, tmp_path):
    base = base_dir()
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_adapter(add_lora(load_model(base)), out, base=base)
    assert not (out / "stale.txt").exists()
    with pytest.raises(ValueError, match="no adapter"):
        save_adapter(load_model(base), out, base=base)
    assert (out / "adapter_config.json").is_file()  # a failed save leaves the old directory
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- errors ------------------------------------------------------------------------------------


@pytest.fixture
def adapter(base_dir, tmp_path):
    base = base_dir()
    return base, save_adapter(add_lora(load_model(base), r=2, alpha=4, targets=["q_proj"]), tmp_path / "ad", base=base)


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_missing_files(adapter, tmp_path):
    base, path = adapter
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(load_model(base), tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_adapter(load_model(base), path)


def test_unknown_peft_type_and_unsupported_options(adapter):
    base, path = adapter
    edit_config(path, peft_type="LOHA")
    with pytest.raises(ValueError, match="peft_type 'LOHA' is not supported"):
        load_adapter(load_model(base), path)
    edit_config(path, peft_type="LORA", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="task_type 'SEQ_CLS' is not supported"):
        load_adapter(load_model(base), path)
    edit_config(path, task_type="CAUSAL_LM")
    edit_config(path, peft_type="LORA", layers_to_transform=[0])
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] is not supported"):
        load_adapter(load_model(base), path)
    edit_config(path, layers_to_transform=None, trainable_token_indices={"wte": [3]})
    model = load_model(base)
    with pytest.raises(ValueError, match=r"adapter_config.json: trainable_token_indices names \['wte'\]"):
        load_adapter(model, path)
    edit_config(path, trainable_token_indices=[3, VOCAB])
    with pytest.raises(ValueError, match=rf"adapter_config.json: trainable token indices must be distinct ids "
                                         rf"in \[0, {VOCAB}\)"):
        load_adapter(model, path)
    edit_config(path, trainable_token_indices=[3, 5])  # rows the weights file does not hold
    with pytest.raises(ValueError, match="no tensor for 'model.embed_tokens.token_adapter.trainable_tokens_delta'"):
        load_adapter(model, path)
    assert not any("lora_" in n or "token_adapter" in n for n, _ in model.named_parameters())


def test_missing_base_dir(adapter, tmp_path):
    _, path = adapter
    edit_config(path, base_model_name_or_path=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="base model .*gone.* not found"):
        load_with_adapter(path)
    edit_config(path, base_model_name_or_path=None)
    with pytest.raises(ValueError, match="base_model_name_or_path is not set"):
        merge_and_save(path, tmp_path / "out")


def test_keys_that_do_not_match_are_named(adapter):
    base, path = adapter
    tensors = load_file(path / "adapter_model.safetensors")
    good = dict(tensors)
    tensors["base_model.model.model.layers.0.self_attn.z_proj.lora_A.weight"] = torch.zeros(2, 32)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="z_proj.lora_A.weight' matches no adapter layer"):
        load_adapter(load_model(base), path)
    del good["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(good, path / "adapter_model.safetensors")
    model = load_model(base)
    with pytest.raises(ValueError, match="no tensor for 'model.layers.1.self_attn.q_proj.lora_B.weight'"):
        load_adapter(model, path)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # refused before touching the model


def test_target_not_in_model_and_wrong_rank(adapter):
    base, path = adapter
    edit_config(path, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="c_attn not found"):
        load_adapter(load_model(base), path)
    edit_config(path, target_modules=["q_proj"], r=3)
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(2, 32\), the model expects \(3, 32\)"):
        load_adapter(load_model(base), path)


def test_gpt2_is_refused(base_dir, tmp_path):
    model = add_lora(load_model(base_dir("gpt2")), targets=["o_proj"])
    with pytest.raises(ValueError, match="GPT-2"):
        save_adapter(model, tmp_path / "ad", base="gpt2")


def test_some_layers_only_and_resuming_into_an_adapted_model(base_dir, tmp_path):
    """A regex target (one layer's q_proj) is written as full module names; loading into a model
    that already has the layers (as a resumed run does) fills them in."""
    base = base_dir()
    model = add_lora(load_model(base), r=2, alpha=4, targets=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    randomise_adapters(model)
    adapter = save_adapter(model, tmp_path / "adapter", base=base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    theirs = peft_model(base, adapter)
    assert max_diff(model, theirs) < 1e-4
    fresh = add_lora(load_model(base), r=2, alpha=4, targets=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    assert load_adapter(fresh, adapter) is fresh
    assert max_diff(fresh, theirs) < 1e-4
    with pytest.raises(ValueError, match="matches no adapter layer"):
        load_adapter(add_lora(load_model(base), r=2, targets=["q_proj"]), adapter)

    prompted = prompt_tuning(load_model(base), 4)
    prompt_dir = save_adapter(prompted, tmp_path / "prompt", base=base)
    fresh = prompt_tuning(load_model(base), 4)
    assert load_adapter(fresh, prompt_dir) is fresh
    assert torch.equal(fresh.prompt_embeddings, prompted.prompt_embeddings)
    with pytest.raises(ValueError, match="4 virtual tokens, the model 5"):
        load_adapter(prompt_tuning(load_model(base), 5), prompt_dir)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_peft_written_adapter_through_the_cli(chat_base, tmp_path, capsys, task_type):
    """`lmforge generate` and `lmforge merge` take an adapter that peft wrote, with or without a task
    type: greedy text equals transformers + peft's, the merged directory equals peft's merged logits."""
    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    theirs = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(chat_base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type=task_type,
        base_model_name_or_path=str(chat_base)))
    randomise_adapters(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()
    assert main(["merge", "--checkpoint", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    tokenizer = Tokenizer.from_dir(chat_base)
    prompt = tokenizer.encode("Nora Yilmaz was born in")
    with torch.no_grad():
        merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        x = torch.tensor([prompt])
        torch.testing.assert_close(merged(x).logits, theirs(x).logits, rtol=1e-4, atol=1e-4)
        expected = theirs.generate(input_ids=x, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "adapter"), "--prompt", "Nora Yilmaz was born in",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"
