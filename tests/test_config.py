"""lmforge.config: YAML recipes with key=value overrides, ModelConfig validation, presets, and the
transformers config.json round trip."""

import re
import typing

import pytest
import transformers as tf
from hf_models import tiny_hf_model
from pydantic import ValidationError
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lmforge.cli import main
from lmforge.config import Family, ModelConfig, load_recipe, load_yaml, parse_override
from lmforge.families import SPELLINGS, family_of
from lmforge.presets import PRESETS, preset
from lmforge.train.sft import SFTConfig

RECIPE = """\
model:
  preset: micro
  dropout: 0.0
train:
  lr: 0.001
  steps: 10
  schedule:
    warmup: 2
data:
  paths: [a.txt]
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def test_load_yaml_without_overrides(recipe):
    assert load_yaml(recipe) == {
        "model": {"preset": "micro", "dropout": 0.0},
        "train": {"lr": 0.001, "steps": 10, "schedule": {"warmup": 2}},
        "data": {"paths": ["a.txt"]},
    }


def test_load_yaml_overrides_are_typed(recipe):
    data = load_yaml(recipe, [
        "train.lr=3e-4",
        "train.steps=200",
        "train.schedule.warmup=0.5",
        "train.compile=true",
        "model.dropout=1.0E-1",
        "data.paths=[x.txt, y.jsonl]",
        "data.weights=[1, 2.5]",
        "model.preset=llama2-7b",
        "out=runs/a=b",  # only the first '=' separates key from value
        "eval.shots=3",  # new sections are created
        "seed=-1",
        "note=",
        "tag=null",
    ])
    train = data["train"]
    assert train["lr"] == 3e-4 and isinstance(train["lr"], float)
    assert train["steps"] == 200 and isinstance(train["steps"], int)
    assert train["schedule"] == {"warmup": 0.5}
    assert train["compile"] is True
    assert data["model"] == {"preset": "llama2-7b", "dropout": 0.1}
    assert data["data"] == {"paths": ["x.txt", "y.jsonl"], "weights": [1, 2.5]}
    assert data["out"] == "runs/a=b"
    assert data["eval"] == {"shots": 3}
    assert data["seed"] == -1
    assert data["note"] == ""
    assert data["tag"] is None


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("-2.5e+2", -250.0), ("6E4", 6e4), ("1_000", 1000), ("0.5", 0.5), ("1e3x", "1e3x"),
    ("true", True), ("false", False), ("'3'", "3"), ("{a: 1}", {"a": 1}), ("inf", "inf"), (".inf", float("inf")),
])
def test_parse_override_values(text, value):
    keys, parsed = parse_override(f"a.b={text}")
    assert keys == ["a", "b"]
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=3", "train.=3", " =3"])
def test_bad_override_form(recipe, item):
    with pytest.raises(ValueError, match="key=value") as error:
        load_yaml(recipe, [item])
    assert repr(item) in str(error.value)


def test_override_into_a_value_is_an_error(recipe):
    with pytest.raises(ValueError, match="lr is not a section"):
        load_yaml(recipe, ["train.lr.max=3"])


SFT_RECIPE = "out_dir: runs/x\nbase: base/\ndata:\n  datasets: [{path: a.jsonl}]\ntrain:\n  steps: 5\n"


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], r"unknown key 'train.stepz'; did you mean 'train.steps'\?"),
    (["data.datasets=[{pathh: a.jsonl}]"],
     r"unknown key 'data.datasets.0.pathh'; did you mean 'data.datasets.0.path'\? \(and 1 more problem\)"),
    (["bogus=1"], "unknown key 'bogus'; valid keys: out_dir, base, data, adapter, train"),
    (["train.steps=many"], "train.steps: Input should be a valid integer.* \\(got 'many'\\)"),
])
def test_recipe_errors_are_one_line_naming_the_key(tmp_path, overrides, message):
    path = tmp_path / "sft.yaml"
    path.write_text(SFT_RECIPE)
    load_recipe(SFTConfig, path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}$") as error:
        load_recipe(SFTConfig, path, overrides)
    assert "\n" not in str(error.value) and "pydantic" not in str(error.value)


def test_cli_prints_the_recipe_error_alone(tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text(SFT_RECIPE)
    assert main(["sft", "--config", str(path), "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err == f"lmforge sft: error: {path}: unknown key 'train.stepz'; did you mean 'train.steps'?\n"


def test_load_yaml_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="invalid YAML") as error:
        load_yaml(bad)
    assert str(bad) in str(error.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty, ["a=1"]) == {"a": 1}


# ---- ModelConfig validation ----------------------------------------------------------------


@pytest.mark.parametrize("fields, named", [
    (dict(num_attention_heads=32, num_key_value_heads=5), "num_key_value_heads"),
    (dict(norm="batchnorm"), "norm"),
    (dict(hidden_sise=64), "hidden_sise"),
    (dict(num_hidden_layers="many"), "num_hidden_layers"),
    (dict(num_hidden_layers=2, sliding_window=4, layer_types=["full_attention"]), "layer_types"),
    (dict(num_hidden_layers=1, layer_types=["global"]), "layer_types"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 64, "long_factor": [2.0] * 64}),
     "original_max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 64, "long_factor": [2.0] * 48,
                        "original_max_position_embeddings": 4096}), "long_factor must be 64"),
    (dict(partial_rotary_factor=0.75, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 64,
          "long_factor": [2.0] * 64, "original_max_position_embeddings": 4096}), "short_factor must be 48"),
    (dict(head_dim=10, partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(shared_block_norm=True), "parallel_residual"),
    (dict(position="sinusoidal"), "position"),
    (dict(num_experts=4, num_experts_per_tok=8), "num_experts_per_tok"),
    (dict(family="bert"), "family"),
])
def test_model_config_errors_name_the_field(fields, named):
    with pytest.raises(ValidationError, match=named):
        ModelConfig(**fields)


def test_model_config_derived_fields():
    cfg = ModelConfig(hidden_size=256, num_attention_heads=8)
    assert cfg.num_key_value_heads == 8 and cfg.head_dim == 32
    cfg = ModelConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 64
    assert ModelConfig(eos_token_id=[2, 7]).eos_token_ids == [2, 7]
    assert ModelConfig(eos_token_id=None).eos_token_ids == []


def test_model_config_validates_assignment():
    cfg = ModelConfig(num_attention_heads=32, num_key_value_heads=8)
    with pytest.raises(ValidationError, match="num_key_value_heads"):
        cfg.num_key_value_heads = 5
    with pytest.raises(ValidationError, match="norm"):
        cfg.norm = "batchnorm"


# ---- presets -------------------------------------------------------------------------------


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="llama2-7bb") as error:
        preset("llama2-7bb")
    message = str(error.value)
    for name in PRESETS:
        assert name in message


def test_preset_overrides():
    cfg = preset("llama2-7b", num_hidden_layers=2, vocab_size=100)
    assert (cfg.num_hidden_layers, cfg.vocab_size, cfg.hidden_size) == (2, 100, 4096)
    assert PRESETS["llama2-7b"].num_hidden_layers == 32  # the preset itself is untouched


def test_preset_overrides_rederive_and_validate():
    """Overriding a preset's size re-derives what came from it, and the result is validated."""
    cfg = preset("llama2-7b", hidden_size=1024, num_attention_heads=16)
    assert (cfg.head_dim, cfg.num_key_value_heads) == (64, 16)
    assert cfg == ModelConfig(hidden_size=1024, num_attention_heads=16, intermediate_size=11008)
    assert preset("mistral-7b", num_attention_heads=16).num_key_value_heads == 8  # the preset set it: kept
    with pytest.raises(ValidationError, match="num_key_value_heads"):
        preset("mistral-7b", num_key_value_heads=5)
    with pytest.raises(ValidationError, match="hidden_sise"):
        preset("gpt2", hidden_sise=5)


def test_preset_copies_do_not_share_state():
    cfg = preset("llama3.1-8b")
    cfg.rope_scaling["factor"] = 2.0
    assert PRESETS["llama3.1-8b"].rope_scaling["factor"] == 8.0


# ---- transformers config.json --------------------------------------------------------------

FAMILIES = ["llama", "llama3", "mistral", "mixtral", "qwen2", "gpt2", "phi3", "phi3-longrope", "falcon", "falcon-new",
            "bloom"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_round_trip(family):
    hf_config = tiny_hf_model(family).config
    cfg = ModelConfig.from_hf(hf_config.to_dict())
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    # transformers reads our config.json as the same model
    theirs = tf.AutoConfig.for_model(**cfg.to_hf())
    assert type(theirs) is type(hf_config)
    assert ModelConfig.from_hf(theirs.to_dict()) == cfg


def test_every_family_is_spelled_as_transformers_names_it():
    """One spelling per family, its model_type and architecture paired as transformers' causal-LM table
    pairs them, and either one read back as the family."""
    assert set(SPELLINGS) == set(typing.get_args(Family))
    for family, spelling in SPELLINGS.items():
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[spelling.model_type] == spelling.architecture
        assert family_of({"architectures": [spelling.architecture]}, "config.json") == family
        assert family_of({"model_type": spelling.model_type}, "config.json") == family


EXPECTED = {  # fields from_hf must read from each family's tiny config (hf_models.py)
    "llama": dict(family="llama", num_key_value_heads=2, head_dim=8, rope_scaling=None, sliding_window=None),
    "llama3": dict(family="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mistral": dict(family="mistral", sliding_window=8, num_experts=0),
    "mixtral": dict(family="mixtral", num_experts=4, num_experts_per_tok=2),
    "qwen2": dict(family="qwen2", qkv_bias=True, attention_bias=False, tie_word_embeddings=True, sliding_window=None),
    "gpt2": dict(family="gpt2", hidden_size=32, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                 norm="layernorm", mlp="gelu", position="learned", attention_bias=True, mlp_bias=True,
                 tie_word_embeddings=True, max_position_embeddings=128),
    "phi3": dict(family="phi3", sliding_window=16, num_key_value_heads=2, partial_rotary_factor=1.0, rope_scaling=None),
    "phi3-longrope": dict(family="phi3", partial_rotary_factor=0.75, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0, 1.5, 2.5], "long_factor": [1.5, 4.0, 12.0],
        "original_max_position_embeddings": 32}),
    "falcon": dict(family="falcon", num_key_value_heads=1, parallel_residual=True, shared_block_norm=True,
                   attention_bias=False, gelu_approximate="none", norm="layernorm", tie_word_embeddings=True),
    "falcon-new": dict(family="falcon", num_key_value_heads=2, parallel_residual=True, shared_block_norm=False,
                       attention_bias=True, mlp_bias=True, intermediate_size=64),
    "bloom": dict(family="bloom", position="alibi", embedding_norm=True, intermediate_size=128, num_key_value_heads=4,
                  gelu_approximate="tanh", attention_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_reads_family_fields(family):
    cfg = ModelConfig.from_hf(tiny_hf_model(family).config.to_dict())
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.bos_token_id, cfg.eos_token_id) == (97, 2, 1, 2)
    for field, value in EXPECTED[family].items():
        assert getattr(cfg, field) == value, field


def test_from_hf_rejects_unsupported_features():
    base = ModelConfig(family="llama").to_hf()
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="pretraining_tp"):
        ModelConfig.from_hf({**base, "pretraining_tp": 2})
    with pytest.raises(ValueError, match="dynamic"):
        ModelConfig.from_hf({**base, "rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="BertForMaskedLM"):
        ModelConfig.from_hf({**base, "architectures": ["BertForMaskedLM"], "model_type": "bert"})
    gpt2 = ModelConfig(family="gpt2", norm="layernorm", mlp="gelu", position="learned").to_hf()
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        ModelConfig.from_hf({**gpt2, "activation_function": "relu"})
    falcon = ModelConfig(family="falcon", norm="layernorm", mlp="gelu", parallel_residual=True).to_hf()
    with pytest.raises(ValueError, match="config.json: alibi=true"):
        ModelConfig.from_hf({**falcon, "alibi": True})
    with pytest.raises(ValueError, match="activation 'relu'"):
        ModelConfig.from_hf({**falcon, "activation": "relu"})
    with pytest.raises(ValueError, match="cannot express position='alibi'"):
        ModelConfig(family="falcon", norm="layernorm", mlp="gelu", position="alibi").to_hf()


# Published config.json files as transformers 4 wrote them (fields that do not matter to the model left out).
PUBLISHED_CONFIGS = {
    "phi3-mini": {  # microsoft/Phi-3-mini-4k-instruct
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": 2047, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
    },
    "falcon-7b": {  # tiiuae/falcon-7b
        "architectures": ["FalconForCausalLM"], "model_type": "falcon", "alibi": False, "bias": False,
        "hidden_size": 4544, "layer_norm_epsilon": 1e-05, "multi_query": True, "new_decoder_architecture": False,
        "num_attention_heads": 71, "num_hidden_layers": 32, "parallel_attn": True, "vocab_size": 65024,
        "bos_token_id": 11, "eos_token_id": 11,
    },
    "falcon-40b": {  # tiiuae/falcon-40b
        "architectures": ["FalconForCausalLM"], "model_type": "falcon", "alibi": False, "bias": False,
        "hidden_size": 8192, "layer_norm_epsilon": 1e-05, "new_decoder_architecture": True, "num_attention_heads": 128,
        "num_hidden_layers": 60, "num_kv_heads": 8, "parallel_attn": True, "vocab_size": 65024, "bos_token_id": 11,
        "eos_token_id": 11,
    },
    "bloom-560m": {  # bigscience/bloom-560m (its old spelling: n_embed, num_attention_heads)
        "architectures": ["BloomForCausalLM"], "model_type": "bloom", "n_embed": 1024, "n_layer": 24,
        "num_attention_heads": 16, "layer_norm_epsilon": 1e-05, "seq_length": 2048, "vocab_size": 250880,
        "apply_residual_connection_post_layernorm": False, "pretraining_tp": 1, "slow_but_exact": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
    },
}


@pytest.mark.parametrize("name", list(PUBLISHED_CONFIGS))
def test_published_config_reads_as_the_preset(name):
    cfg = ModelConfig.from_hf(PUBLISHED_CONFIGS[name])
    assert cfg == PRESETS[name].model_copy(update={"torch_dtype": cfg.torch_dtype})
