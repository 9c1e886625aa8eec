"""Seq2seq fine-tuning through `lmforge sft` with a T5 base (v1.1 style, Unigram tokenizer): full and LoRA runs
learn, resume exactly, and write files the ecosystem loads: the adapter in `peft.PeftModel` and the merged
model in `AutoModelForSeq2SeqLM` with equal logits; a peft-written LoRA and soft prompt load in lmforge with
equal logits and greedy output; QLoRA against the dequantised dense model; recipe and FSDP checks."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARPEN
from safetensors.torch import load_file
from t5_models import pairs, save_tiny_t5, write_pairs

from lmforge.cli import main
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.seq2seq import Seq2SeqEngine
from lmforge.peft import AdapterConfig, LoRALinear, apply_method, load_with_adapter, save_adapter
from lmforge.peft.prompt_tuning import Seq2SeqPromptTuned
from lmforge.seq2seq_checkpoint import load_seq2seq
from lmforge.train.distributed import shard_units
from lmforge.train.sft import load_sft_config

ALL = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Training base: no dropout, so the loss curves compared below are deterministic."""
    return save_tiny_t5(tmp_path_factory.mktemp("t5") / "base", dropout=0.0)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory) -> Path:
    """Parity base: weights sharpened as conftest's, so a wrong scale or mask shows far above 1e-4."""
    return save_tiny_t5(tmp_path_factory.mktemp("t5") / "sharp", sharpen=SHARPEN)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", pairs(80))


def recipe(root: Path, base: Path, data: Path, method: str, steps: int, **adapter) -> Path:
    config = {"out_dir": str(root / "out"), "base": str(base),
              "data": {"datasets": [{"path": str(data), "prefix": "summarize: "}], "max_source_len": 40,
                       "max_target_len": 16, "val_fraction": 0.1, "eval_batches": 2},
              "adapter": {"method": method, "r": 4, "alpha": 8, **adapter},
              "train": {"steps": steps, "micro_batch_size": 4, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 1,
                        "log_every": 1, "eval_every": 2, "save_every": 2, "keep_last": 10}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "sft.yaml").write_text(json.dumps(config))
    return root / "sft.yaml"


def val_losses(out: Path) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    decoder = torch.randint(3, vocab, (3, 7), generator=g)
    decoder[:, 0] = 0
    return ids.masked_fill(mask == 0, 0), mask, decoder


def logits_pair(ours, theirs, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask, decoder = batch(vocab)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        return ours(ids, decoder, attention_mask=mask), want


def test_lora_run_learns_resumes_exactly_and_loads_in_peft_and_merges(tmp_path, base, data):
    import peft
    import transformers as tf

    path = recipe(tmp_path, base, data, "lora", 8)
    assert main(["sft", "--config", str(path)]) == 0
    out = tmp_path / "out"
    losses = val_losses(out)
    assert losses[-1] < losses[0] - 0.1, losses
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["task_type"], config["target_modules"]) == ("SEQ_2_SEQ_LM", ["q", "v"])  # PEFT's T5 default
    keys = set(load_file(adapter / "adapter_model.safetensors"))
    assert "base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_B.weight" in keys and len(keys) == 24
    assert "| summarize: " in (out / "report.md").read_text()  # sample generations from the encoder inputs

    # Killed after the step-6 checkpoint: resuming reproduces the uninterrupted run exactly.
    shutil.rmtree(out / "checkpoints" / "step-000008")
    shutil.move(adapter, tmp_path / "uninterrupted")
    assert main(["sft", "--config", str(path), "--resume"]) == 0
    a = load_file(tmp_path / "uninterrupted" / "adapter_model.safetensors")
    b = load_file(adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert val_losses(out) == losses

    tuned = load_with_adapter(adapter)
    hf = peft.PeftModel.from_pretrained(tf.T5ForConditionalGeneration.from_pretrained(base), adapter).eval()
    ours, want = logits_pair(tuned, hf, tuned.config.vocab_size)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-4)
    plain, _ = logits_pair(load_seq2seq(base), hf, tuned.config.vocab_size)
    assert (plain - want).abs().max() > 1e-2  # the adapter changed something

    assert main(["merge", "--checkpoint", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = tf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(*logits_pair(tuned, merged, tuned.config.vocab_size), rtol=0, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_full_fine_tuning_learns_and_writes_a_t5_directory(tmp_path, base, data):
    import transformers as tf

    assert main(["sft", "--config", str(recipe(tmp_path, base, data, "full", 4))]) == 0
    losses = val_losses(tmp_path / "out")
    assert losses[-1] < losses[0], losses
    model_dir = tmp_path / "out" / "model"
    ours = load_seq2seq(model_dir)
    theirs = tf.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    torch.testing.assert_close(*logits_pair(ours, theirs, ours.config.vocab_size), rtol=0, atol=1e-4)
    changed = load_seq2seq(base).state_dict()
    assert not torch.equal(changed["lm_head.weight"], ours.lm_head.weight)


@pytest.mark.parametrize("targets", [["q", "v"], ALL, "all-linear"])
def test_lora_adapter_loads_in_peft_with_equal_logits(tmp_path, sharp, targets):
    import peft
    import transformers as tf

    model = apply_method(load_seq2seq(sharp), AdapterConfig(method="lora", r=4, alpha=8, targets=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(model, tmp_path / "adapter", base=sharp)
    hf = peft.PeftModel.from_pretrained(tf.T5ForConditionalGeneration.from_pretrained(sharp), tmp_path / "adapter")
    ours, want = logits_pair(model.eval(), hf.eval(), model.config.vocab_size)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-4)
    # q, v: 2 per encoder block, 4 per decoder block (self and cross); all: 7 and 11
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == (12 if targets == ["q", "v"] else 36)


def test_peft_written_lora_loads_with_equal_logits_and_greedy_output(tmp_path, sharp):
    import peft
    import transformers as tf

    from test_seq2seq import hf_greedy

    config = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=ALL,
                             init_lora_weights=False)  # random B: the adapter changes the output
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tf.T5ForConditionalGeneration.from_pretrained(sharp), config).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_with_adapter(tmp_path / "theirs")
    torch.testing.assert_close(*logits_pair(ours, theirs, ours.config.vocab_size), rtol=0, atol=1e-4)
    prompts = [[5, 9, 12, 7, 1], [8, 4, 1], [11, 6, 10, 1]]
    greedy = Seq2SeqEngine(ours).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    assert greedy == hf_greedy(theirs, prompts, 8)


def test_qlora_logits_match_the_dequantised_dense_model(sharp):
    base = load_seq2seq(sharp)
    qlora = apply_method(copy.deepcopy(base), AdapterConfig(method="qlora", r=4, alpha=8, targets=["q", "wo"]))
    assert type(qlora.encoder.block[0].layer[1].DenseReluDense.wi_0.weight).__name__ == "NF4Tensor"  # not a target
    oracle = copy.deepcopy(base)
    weights = dict(oracle.named_parameters())
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
        for name, m in qlora.named_modules():
            if hasattr(m, "dense_weight"):
                w = m.weight.get_original_weight().double()
                if isinstance(m, LoRALinear):
                    w = w + m.lora_B.weight.double() @ m.lora_A.weight.double() * m.scaling
                weights[f"{name}.weight"].copy_(w)
    ids, mask, decoder = batch(base.config.vocab_size)
    with torch.no_grad():
        want = oracle(ids, decoder, attention_mask=mask)
        # LoRA beside the weight vs merged into it: fp32 rounding through sharpened weights, which already puts
        # the dense fp32 forward 3e-4 from fp64's at logits up to 16 here; so the bound scales with the logits.
        torch.testing.assert_close(qlora(ids, decoder, attention_mask=mask), want, rtol=0,
                                   atol=5e-5 * want.abs().max().item())
        assert (base(ids, decoder, attention_mask=mask) - want).abs().max() > 1e-2  # NF4 and LoRA both show


def test_prompt_tuning_matches_peft_both_ways(tmp_path, sharp):
    """PEFT's seq2seq prompt tuning puts the soft prompt before the encoder's input only (the decoder rows of
    its default 2 submodules are never read): lmforge's adapter loads in PEFT and PEFT's in lmforge."""
    import peft
    import transformers as tf
    from test_seq2seq import hf_greedy

    model = apply_method(load_seq2seq(sharp), AdapterConfig(method="prompt", num_virtual_tokens=3))
    assert isinstance(model, Seq2SeqPromptTuned)
    save_adapter(model, tmp_path / "ours", base=sharp)
    hf = peft.PeftModel.from_pretrained(tf.T5ForConditionalGeneration.from_pretrained(sharp), tmp_path / "ours")
    torch.testing.assert_close(*logits_pair(model.eval(), hf.eval(), model.config.vocab_size), rtol=0, atol=1e-4)

    torch.manual_seed(0)
    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2)  # 2 submodules: (4, D)
    theirs = peft.get_peft_model(tf.T5ForConditionalGeneration.from_pretrained(sharp), config).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_with_adapter(tmp_path / "theirs")
    assert loaded.prompt_embeddings.shape[0] == 4 and loaded.num_virtual_tokens == 2
    torch.testing.assert_close(*logits_pair(loaded.eval(), theirs, loaded.config.vocab_size), rtol=0, atol=1e-4)
    prompts = [[5, 9, 12, 7, 1], [8, 4, 1], [11, 6, 10, 1]]
    greedy = Seq2SeqEngine(loaded).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    assert greedy == hf_greedy(theirs, prompts, 8)


def test_recipe_data_section_follows_the_base(tmp_path, base, data):
    from lmforge.train.sft import sft

    path = recipe(tmp_path, base, data, "lora", 2)
    with pytest.raises(ValueError, match="data sets max_len .* and max_source_len"):
        load_sft_config(path, ["data.max_len=64"])
    decoder = tmp_path / "llama"
    decoder.mkdir()
    (decoder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"data.max_source_len: .*llama is a decoder-only model"):
        sft(load_sft_config(path, [f"base={decoder}"]))
    config = json.loads(path.read_text())
    config["data"] = {"datasets": [{"path": str(data)}], "max_len": 64}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"data.max_len: .*base is an encoder-decoder model"):
        sft(load_sft_config(path, []))


def test_fsdp_shards_encoder_and_decoder_blocks(sharp):
    model = load_seq2seq(sharp)
    units = shard_units(model)
    enc, dec = model.encoder.block, model.decoder.block
    # block 0 of each stack holds the bias table the stack reads first; decoder cross-attention keys are
    # computed before the decoder runs: those stay with the root
    assert units == [enc[0].layer[1], enc[1], dec[0].layer[2], dec[1].layer[0], dec[1].layer[2]]


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one(tmp_path, base, data):
    """Full fine-tuning under torchrun with FSDP2 (2 gloo processes, 4 rows each) equals one process with 8."""
    import os
    import subprocess
    import sys

    outs = {}
    for name, strategy, procs in (("one", "ddp", 1), ("fsdp", "fsdp", 2)):
        path = recipe(tmp_path / name, base, data, "full", 3)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
        # Adam's eps at 1e-3, near the gradients' own size: at the default 1e-8 a step is about lr x sign(gradient),
        # so an element that nearly cancels, summed in another order, moves its weight by up to lr (1e-2) either
        # way; with eps this large the step follows the gradient smoothly and the noise stays far below the
        # tolerance, while a wrong gradient (missed or doubled shards) still moves weights by ~lr.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m",
               "lmforge.cli", "sft", "--config", str(path), f"train.strategy={strategy}",
               f"train.micro_batch_size={8 // (2 * procs)}", "train.eps=1e-3"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[name] = load_file(tmp_path / name / "out" / "model" / "model.safetensors")
    assert outs["one"].keys() == outs["fsdp"].keys()
    for key, value in outs["one"].items():  # fp32 sums in another order, through three Adam steps: as test_pretrain
        torch.testing.assert_close(outs["fsdp"][key], value, rtol=1e-4, atol=1e-5)
    start = load_file(base / "model.safetensors")
    assert max(float((value - start[key]).abs().max()) for key, value in outs["one"].items()) > 1e-3  # it trained
