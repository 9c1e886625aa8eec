"""lmforge.checkpoint: sharded and atomic saves, clear errors on bad directories, dtype round trips,
each checked against what transformers reads and writes."""

import json
import struct

import pytest
import torch
import transformers as tf
from hf_models import VOCAB
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lmforge.checkpoint as ckpt
from lmforge.checkpoint import INDEX, WEIGHTS, load_model, parse_size, save_model


def _ids(batch: int = 2, seq: int = 20) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _snapshot(path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _set_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


# ---- sharding ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "mixtral", "gpt2"])
def test_sharded_save_loads_in_lmforge_and_transformers(hf_checkpoint, tmp_path, name):
    hf, path = hf_checkpoint(name)
    ids = _ids()
    reference = _logits(hf, ids)
    model = load_model(path)
    limit = 20_000
    out = save_model(model, tmp_path / "sharded", max_shard_size=limit)

    assert not (out / WEIGHTS).exists()
    index = json.loads((out / INDEX).read_text())
    shards = sorted(f.name for f in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        tensors = load_file(out / shard)
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(tensors)
        shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert shard_bytes <= limit or len(tensors) == 1  # only a single oversized tensor may exceed it
        total += shard_bytes
    assert index["metadata"]["total_size"] == total

    assert (_logits(load_model(out), ids) - reference).abs().max() < 1e-4
    theirs = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (_logits(theirs, ids) - reference).abs().max() < 1e-4


def test_loads_checkpoint_sharded_by_transformers(hf_checkpoint):
    hf, path = hf_checkpoint("mixtral", max_shard_size="20KB")
    assert (path / INDEX).is_file() and not (path / WEIGHTS).exists()
    ids = _ids()
    assert (_logits(load_model(path), ids) - _logits(hf, ids)).abs().max() < 1e-4


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1.5kb") == 1500
    assert parse_size("123") == parse_size(123) == 123
    with pytest.raises(ValueError, match="5 parsecs"):
        parse_size("5 parsecs")


def test_saving_over_a_checkpoint_replaces_it_entirely(hf_checkpoint, tmp_path):
    """A single-file save over a sharded one must not leave the old index behind to be read."""
    hf, path = hf_checkpoint("llama")
    model = load_model(path)
    out = tmp_path / "out"
    save_model(model, out, max_shard_size=20_000)
    assert (out / INDEX).exists()
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    save_model(model, out)
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "generation_config.json", WEIGHTS]
    ids = _ids()
    assert torch.equal(_logits(load_model(out), ids), _logits(model, ids))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["hf-llama", "out"]


# ---- atomic writes -------------------------------------------------------------------------


def test_failed_weight_write_leaves_existing_checkpoint_untouched(hf_checkpoint, tmp_path, monkeypatch):
    _, path = hf_checkpoint("llama")
    model = load_model(path)
    parent = tmp_path / "runs"
    out = save_model(model, parent / "out")
    before = _snapshot(out)

    calls = []
    real_save_file = ckpt.save_file

    def failing_save_file(tensors, filename, **kwargs):
        calls.append(filename)
        real_save_file(tensors, filename, **kwargs)  # the first shard lands on disk, the second fails
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    with pytest.raises(OSError, match="disk full"):
        save_model(model, out, max_shard_size=20_000)
    assert len(calls) == 2 and calls[0].parent != out  # it wrote into a temporary directory
    assert _snapshot(out) == before
    assert [p.name for p in parent.iterdir()] == ["out"]


def test_failed_tokenizer_write_leaves_no_partial_checkpoint(hf_checkpoint, tmp_path):
    """Failing after the weights and config.json were written: nothing appears at `out`."""
    _, path = hf_checkpoint("gpt2")
    model = load_model(path)

    class BrokenTokenizer:
        def save(self, directory):
            (directory / "tokenizer.json").write_text("{")
            raise RuntimeError("tokenizer exploded")

    parent = tmp_path / "runs"
    parent.mkdir()
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        save_model(model, parent / "out", tokenizer=BrokenTokenizer())
    assert list(parent.iterdir()) == []


# ---- bad input -----------------------------------------------------------------------------


@pytest.fixture
def llama_dir(hf_checkpoint):
    return hf_checkpoint("llama")[1]


def test_truncated_weights_file(llama_dir):
    file = llama_dir / WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated") as error:
        load_model(llama_dir)
    assert str(file) in str(error.value)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00garbage" * 1000,  # header length absurdly large
        b"abc",  # shorter than the length prefix
        struct.pack("<Q", 16) + b"this is not json" + bytes(64),  # plausible length, invalid header
    ],
)
def test_garbage_weights_file(llama_dir, garbage):
    file = llama_dir / WEIGHTS
    file.write_bytes(garbage)
    with pytest.raises(ValueError) as error:
        load_model(llama_dir)
    assert str(file) in str(error.value)


def _rewrite_weights(path, change) -> None:
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_dir):
    _rewrite_weights(llama_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(llama_dir)


def test_unexpected_tensor_is_named(llama_dir):
    _rewrite_weights(llama_dir, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.mystery\.weight"):
        load_model(llama_dir)


def test_old_rotary_inv_freq_buffers_are_ignored(hf_checkpoint):
    """Checkpoints saved by transformers < 4.31 hold a `rotary_emb.inv_freq` buffer per layer;
    transformers skips them on load, and so must we."""
    hf, path = hf_checkpoint("llama")
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    _rewrite_weights(path, lambda t: t.update(
        {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(2)}
    ))
    ids = _ids()
    assert (_logits(load_model(path), ids) - _logits(hf, ids)).abs().max() < 1e-4
    theirs = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    assert (_logits(theirs, ids) - _logits(hf, ids)).abs().max() < 1e-4


def test_shape_mismatch_from_config_names_tensor_and_shapes(llama_dir):
    _set_config(llama_dir, intermediate_size=48)
    with pytest.raises(ValueError) as error:
        load_model(llama_dir)
    message = str(error.value)
    assert "model.layers.0.mlp.gate_proj.weight: shape (64, 32) on disk, model expects (48, 32)" in message
    assert "model.layers.1.mlp.down_proj.weight: shape (32, 64) on disk, model expects (32, 48)" in message
    assert str(llama_dir) in message


def test_shape_mismatch_of_one_tensor(llama_dir):
    _rewrite_weights(llama_dir, lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(16, 32)}))
    with pytest.raises(ValueError) as error:
        load_model(llama_dir)
    message = str(error.value)
    assert "model.layers.1.self_attn.q_proj.weight" in message
    assert "(16, 32)" in message and "(32, 32)" in message
    assert "layers.0" not in message  # only the bad tensor is reported


def test_unknown_architecture(llama_dir):
    _set_config(llama_dir, architectures=["BertForMaskedLM"], model_type="bert")
    with pytest.raises(ValueError, match="BertForMaskedLM") as error:
        load_model(llama_dir)
    assert "LlamaForCausalLM" in str(error.value)  # and says what is supported


def test_missing_config(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(llama_dir)


def test_invalid_config_json(llama_dir):
    (llama_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        load_model(llama_dir)


def test_invalid_config_field_is_named(llama_dir):
    _set_config(llama_dir, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_model(llama_dir)


def test_only_pytorch_bin(llama_dir):
    torch.save(load_file(llama_dir / WEIGHTS), llama_dir / "pytorch_model.bin")
    (llama_dir / WEIGHTS).unlink()
    with pytest.raises(ValueError, match="safetensors only"):
        load_model(llama_dir)


def test_no_weights_at_all(llama_dir):
    (llama_dir / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_model(llama_dir)


def test_shard_named_in_index_is_missing(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama")
    out = save_model(load_model(path), tmp_path / "sharded", max_shard_size=20_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(out)


def test_unsupported_dtype(llama_dir):
    with pytest.raises(ValueError, match="int8"):
        load_model(llama_dir, dtype="int8")


# ---- dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_bf16_round_trip(hf_checkpoint, tmp_path, dtype):
    hf, path = hf_checkpoint("qwen2")  # tied embeddings and q/k/v biases
    model = load_model(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.torch_dtype == "bfloat16"
    for name, p in hf.named_parameters():  # values are the fp32 originals rounded to bf16
        assert torch.equal(model.get_parameter(name), p.detach().to(torch.bfloat16)), name

    out = save_model(model, tmp_path / "bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    reloaded = load_model(out)  # the config's dtype is the default
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    for name, p in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p), name

    theirs = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert {p.dtype for p in theirs.parameters()} == {torch.bfloat16}
    for name, p in theirs.named_parameters():
        assert torch.equal(p, model.get_parameter(name)), name
    ids = _ids()
    theirs32 = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (_logits(theirs32, ids) - _logits(load_model(out, dtype=torch.float32), ids)).abs().max() < 1e-4
