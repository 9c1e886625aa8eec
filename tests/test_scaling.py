"""lmforge.scaling: the planner's counts against transformers and by hand, published figures, the
Chinchilla optimum, the L(N, D) fit on synthetic losses, and an IsoFLOP sweep on the built-in world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.presets import PRESETS
from lmforge.scaling import (
    CHINCHILLA, ScalingLaw, compute_optimal, plan, plan_model, render_compute_optimal, render_plan,
)
from lmforge.scaling.fitting import fit_law
from lmforge.scaling.isoflop import fit, load_sweep_config, plan_runs, sweep
from lmforge.scaling.planner import (
    GIB, NF4_BYTES, activation_bytes, logits_bytes, model_layout, model_state_bytes,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "lm_head")


def hf_meta_model(cfg: ModelConfig):
    import transformers as tf

    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**cfg.to_hf()))


# ---- counts against transformers and by hand -----------------------------------------------------


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-70b", "llama3-8b", "mistral-7b", "mixtral-8x7b",
                                  "qwen2.5-0.5b", "gpt2"])
def test_counts_match_transformers(name):
    """The embedding / non-embedding split, FLOPs per token and NF4-quantised weights, counted from
    transformers' own modules (parameters() yields a tied embedding once)."""
    cfg, seq = PRESETS[name], 2048
    params = dict(hf_meta_model(cfg).named_parameters())
    embedding = sum(p.numel() for n, p in params.items() if any(k in n for k in EMBEDDING_NAMES))
    total = sum(p.numel() for p in params.values())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    inactive = experts * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts if cfg.num_experts else 0
    matrices = sum(p.numel() for n, p in params.items()
                   if p.dim() >= 2 and (".layers." in n or ".h." in n) and not n.endswith("mlp.gate.weight"))

    p = plan_model(cfg, seq_len=seq)
    assert (p.params, p.embedding_params, p.non_embedding_params) == (total, embedding, total - embedding)
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq
    routers = sum(p.numel() for n, p in params.items() if n.endswith("mlp.gate.weight"))
    matmul = matrices + routers - inactive + cfg.vocab_size * cfg.hidden_size  # the head is a matmul, the lookup is not
    assert p.attention_flops_per_token == attention
    assert p.flops_per_token == 6 * matmul + attention
    assert model_layout(cfg, 8).linear_weights == matrices


def test_gpt2_by_hand():
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    p = plan(preset="gpt2", tokens=1e9)
    assert p.params == vocab * d + ctx * d + layers * block + 2 * d == 124_439_808  # tied head
    assert p.embedding_params == vocab * d + ctx * d
    matrices = d * 3 * d + d * d + 2 * d * 4 * d  # qkv, attention out, MLP up and down
    assert p.seq_len == ctx and p.flops_per_token == 6 * (layers * matrices + vocab * d) + 12 * layers * d * ctx
    assert p.train_flops == p.flops_per_token * 1e9
    assert p.petaflop_days == pytest.approx(p.train_flops / (1e15 * 86400))


# ---- published figures ---------------------------------------------------------------------------


def test_llama2_7b_plan_text():
    text = render_plan(plan(preset="llama2-7b", gpus=8, gpu_mem=80, strategy="fsdp"))
    assert "6.74 B" in text and "FSDP *" in text and "Korthikanti" in text


def test_chinchilla_figures():
    # Chinchilla: 70B parameters on 1.4T tokens, C = 6ND = 5.88e23 (the paper quotes Gopher's 5.76e23 budget)
    p = plan(preset="llama2-70b", tokens=1.4e12)
    assert p.chinchilla_flops == 6 * p.params * 1.4e12 == pytest.approx(5.8e23, rel=0.01)
    rule = compute_optimal(5.88e23).rule
    assert rule.params == pytest.approx(70e9, rel=1e-3) and rule.tokens == pytest.approx(1.4e12, rel=1e-3)
    assert CHINCHILLA.loss(70e9, 1.4e12) == pytest.approx(1.937, abs=1e-3)


def test_law_optimum_minimises_the_loss_at_fixed_compute():
    for flops in (1e18, 5.76e23):
        best = compute_optimal(flops).optimum
        assert 6 * best.params * best.tokens == pytest.approx(flops)
        n = best.params * np.geomspace(0.5, 2, 101)
        losses = CHINCHILLA.loss(n, flops / (6 * n))
        assert n[losses.argmin()] == pytest.approx(best.params, rel=0.02)
        assert losses.min() == pytest.approx(best.loss, abs=1e-6)
    assert CHINCHILLA.params_exponent == pytest.approx(0.28 / 0.62)
    text = render_compute_optimal(compute_optimal(5.76e23))
    assert "32.2 B" in text and "69.3 B" in text and "20.0" in text


# ---- memory ---------------------------------------------------------------------------------------


def test_adamw_mixed_precision_is_16_bytes_per_parameter_plus_activations():
    p = plan_model(PRESETS["llama2-7b"], seq_len=4096, micro_batch=2, recompute="selective")
    ddp = p.memory["ddp"]
    assert ddp.weights + ddp.gradients + ddp.optimizer == 16 * p.params
    assert ddp.total == 16 * p.params + p.activations["selective"] + logits_bytes(p.model, 4096, 2)
    # ZeRO (Rajbhandari et al. 2020, figure 1): 7.5B parameters, 120 GB of model states; 1.88 GB per GPU at ZeRO-3 on 64
    assert sum(model_state_bytes(7.5e9, "ddp")) == 120e9
    assert sum(model_state_bytes(7.5e9, "fsdp", 64)) == pytest.approx(1.875e9)


def test_ddp_and_fsdp_divide_the_right_terms():
    cfg = PRESETS["llama2-7b"]
    one, eight = plan_model(cfg, gpus=1), plan_model(cfg, gpus=8)
    assert eight.memory["ddp"] == one.memory["ddp"]  # DDP replicates everything
    ddp, fsdp = eight.memory["ddp"], eight.memory["fsdp"]
    for term in ("weights", "gradients", "optimizer"):
        assert getattr(fsdp, term) == getattr(ddp, term) / 8
    assert (fsdp.activations, fsdp.logits) == (ddp.activations, ddp.logits)  # per micro-batch: not sharded
    assert ddp.gathered == 0 and fsdp.gathered == 4 * model_layout(cfg, 8).largest_unit
    assert model_layout(cfg, 8).largest_unit == 2 * 32000 * 4096 + 4096  # embeddings, head and final norm
    assert eight.fits("fsdp") and not eight.fits("ddp") and not one.fits("fsdp")
    assert eight.seconds == pytest.approx(eight.train_flops / (8 * 312e12 * 0.4))


def test_activations_by_hand():
    cfg = PRESETS["llama2-7b"]
    s, b, h, a, layers = 4096, 2, 4096, 32, 32
    assert activation_bytes(cfg, s, b, "none") == layers * s * b * h * (34 + 5 * a * s / h)
    assert activation_bytes(cfg, s, b, "selective") == layers * s * b * h * 34
    assert activation_bytes(cfg, s, b, "full") == layers * 2 * s * b * h + s * b * h * 34
    assert logits_bytes(cfg, s, b) == 4 * s * b * 32000


def test_qlora_by_hand():
    d, ffn, layers, r = 4096, 11008, 32, 16
    p = plan_model(PRESETS["llama2-7b"], lora_rank=r)
    linear = layers * (4 * d * d + 3 * d * ffn)
    lora = layers * r * (4 * (d + d) + 2 * (d + ffn) + (ffn + d))
    q = p.memory["qlora"]
    assert NF4_BYTES == pytest.approx(4.127 / 8, abs=1e-4)  # QLoRA's double quantisation
    assert q.weights == pytest.approx(NF4_BYTES * linear + 2 * (p.params - linear) + 2 * lora)
    assert (q.gradients, q.optimizer, q.gathered) == (2 * lora, 12 * lora, 0)
    assert 3.5 < q.weights / GIB < 4  # a 7B model in NF4


def test_kv_cache_and_inference():
    cfg = PRESETS["mistral-7b"]
    p = plan_model(cfg, seq_len=8192, micro_batch=4)
    assert p.kv_cache_bytes == cfg.kv_cache_bytes_per_token() * 8192 * 4 == 4 * GIB
    assert p.inference_bytes == 2 * p.params + p.kv_cache_bytes


# ---- plans from files --------------------------------------------------------------------------


def test_plan_from_a_recipe(tmp_path):
    p = plan(config=CONFIGS / "pretrain-tiny.yaml", overrides=["train.activation_checkpointing=true"], gpus=2)
    # 4 layers, hidden 128 (the recipe's overrides); runs/tok is absent, so the preset's vocabulary stays
    assert (p.model.num_hidden_layers, p.model.hidden_size, p.seq_len, p.micro_batch) == (4, 128, 128, 16)
    assert p.tokens == 600 * 16 * 1 * 2 * 128 and p.recompute == "full" and p.strategy == "ddp"
    assert plan(config=CONFIGS / "pretrain-tiny.yaml", tokens=5e6, seq_len=64).tokens == 5e6
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(PRESETS["llama3-8b"].to_hf()))
    assert plan(config=model_dir).params == plan(preset="llama3-8b").params
    assert plan(config=model_dir / "config.json", overrides=["num_hidden_layers=16"]).model.num_hidden_layers == 16


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="llama9-1b"), "unknown preset 'llama9-1b'"),
    (dict(), "either a preset or a config"),
    (dict(preset="gpt2", config="x.yaml"), "either a preset or a config"),
    (dict(config="missing.yaml"), "missing.yaml"),
    (dict(preset="gpt2", gpus=0), "gpus"),
    (dict(preset="gpt2", tokens=-1.0), "tokens"),
    (dict(preset="gpt2", mfu=1.5), "mfu"),
    (dict(preset="gpt2", strategy="zero2"), "strategy"),
    (dict(preset="gpt2", overrides=["attn.heads=3"]), "not nested"),
])
def test_bad_plans(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        plan(**kwargs)


@pytest.mark.parametrize("flops", [-1.0, 0, math.nan, math.inf, "1e20"])
def test_bad_flops(flops):
    with pytest.raises(ValueError, match="flops must be a positive number"):
        compute_optimal(flops)


# ---- the fit ----------------------------------------------------------------------------------


def test_fit_recovers_a_known_law():
    """Losses drawn from a known law on an IsoFLOP grid with 1% multiplicative noise."""
    truth = ScalingLaw(E=1.8, A=500.0, B=900.0, alpha=0.36, beta=0.30)
    rng = np.random.default_rng(0)
    n, d = [], []
    for flops in np.geomspace(1e18, 1e22, 5):
        for factor in np.geomspace(0.1, 10, 7):
            n.append(truth.optimal_params(flops) * factor)
            d.append(flops / (6 * n[-1]))
    losses = truth.loss(np.array(n), np.array(d)) * np.exp(rng.normal(0, 0.01, len(n)))
    got = fit_law(n, d, losses).law
    assert got.alpha == pytest.approx(truth.alpha, abs=0.05)
    assert got.beta == pytest.approx(truth.beta, abs=0.05)
    assert got.E == pytest.approx(truth.E, abs=0.1)
    assert got.params_exponent == pytest.approx(truth.params_exponent, abs=0.03)
    with pytest.raises(ValueError, match="at least 5"):
        fit_law(n[:4], d[:4], losses[:4])
    with pytest.raises(ValueError, match="positive"):
        fit_law(n, d, -losses)


def test_fit_needs_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        fit(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no runs in"):
        fit(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "run.json").write_text(json.dumps(
        dict(name="a", model="m", flops=1e10, params=1000, tokens=10**6, steps=10)))
    with pytest.raises(ValueError, match="0 finished runs \\(1 unfinished\\)"):
        fit(tmp_path)


# ---- the sweep --------------------------------------------------------------------------------


def test_sweep_recipe_runs():
    config = load_sweep_config(CONFIGS / "scaling-sweep.yaml")
    runs, skipped = plan_runs(config)
    assert len(runs) + len(skipped) == len(config.models) * len(config.flops)
    for spec, run in runs:
        step_tokens = run.train.micro_batch_size * run.train.grad_accum * run.data.seq_len
        assert abs(spec.flops / (6 * spec.params) - spec.tokens) <= step_tokens / 2  # D = C / 6N
        assert spec.tokens == run.train.steps * step_tokens and run.out_dir == config.out_dir / spec.name


@pytest.mark.parametrize("override, message", [
    ("flops=[-1]", "flops"),
    ("models={}", "models"),
    ("pretrain.out_dir=x", "pretrain.out_dir"),
    ("pretrain.train.lr=fast", "lr"),
])
def test_bad_sweep_configs(override, message):
    with pytest.raises(ValueError, match=message):
        plan_runs(load_sweep_config(CONFIGS / "scaling-sweep.yaml", [override]))


@pytest.mark.slow
def test_sweep_on_the_world_then_fit(tmp_path):
    from lmforge.tokenizer import train_tokenizer
    from lmforge.world.documents import write_pretraining_corpus
    from lmforge.world.people import make_world

    corpus = write_pretraining_corpus(make_world(0, n_people=40, n_companies=4), tmp_path / "corpus.jsonl", variants=4)
    train_tokenizer([corpus], 300, tmp_path / "tok", show_progress=False)
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'runs'}
pretrain:
  model: {{preset: micro, overrides: {{max_position_embeddings: 32, num_attention_heads: 2, num_key_value_heads: 1}}}}
  data: {{paths: [{corpus}], tokenizer: {tmp_path / 'tok'}, seq_len: 32, workers: 1, eval_batches: 4}}
  train: {{micro_batch_size: 16, lr: 1.0e-2, warmup_steps: 3, log_every: 10, peak_flops: 1.0e+11}}
models:
  h16: {{hidden_size: 16, intermediate_size: 48, num_hidden_layers: 1}}
  h32: {{hidden_size: 32, intermediate_size: 96, num_hidden_layers: 1}}
  h48: {{hidden_size: 48, intermediate_size: 128, num_hidden_layers: 2}}
flops: [1.0e+9, 3.0e+9, 1.0e+10]
min_steps: 10
""")
    runs_dir = sweep(config, ["pretrain.train.lr=1.0e-2"])
    result = fit(runs_dir)
    assert len(result.runs) + len(json.loads((runs_dir / "sweep.json").read_text())["skipped"]) == 9
    assert not result.unfinished and len(result.runs) >= 5
    law = result.law
    assert all(map(math.isfinite, (law.E, law.A, law.B, law.alpha, law.beta)))
    assert result.plot.stat().st_size > 10_000 and result.report.parent == result.plot.parent
    report = result.report.read_text()
    assert f"| {law.alpha:.3f} | {law.beta:.3f} |" in report and "N_opt(C) =" in report and "scaling.png" in report
    for run in result.runs:
        assert f"| {run.name} |" in report
    stamp = (runs_dir / result.runs[0].name / "metrics.jsonl").stat().st_mtime_ns
    assert sweep(config) == runs_dir  # finished runs are not trained again
    assert (runs_dir / result.runs[0].name / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_plan_and_scaling_commands(capsys):
    from lmforge.cli import main

    assert main(["plan", "--preset", "llama2-7b", "--gpus", "8", "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "6.74 B" in out and "FSDP" in out and "fits" in out
    assert main(["plan", "--flops", "5.88e23"]) == 0
    assert "20 tokens/parameter" in capsys.readouterr().out
    assert main(["plan", "--flops", "-1"]) == 2
    assert "flops" in capsys.readouterr().err
    assert main(["plan", "--preset", "llama9-1t"]) == 2
    assert "llama9-1t" in capsys.readouterr().err
