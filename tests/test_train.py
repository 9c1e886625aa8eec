"""The shared training loop: schedule, decay groups, clipping, invariance, resume, divergence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from lmforge.presets import preset
from lmforge.model import Transformer
from lmforge.data.chat import IGNORE, length_groups
from lmforge.train.loop import Trainer, TrainConfig, TrainingDiverged
from lmforge.train.losses import causal_lm_loss
from lmforge.train.optim import clip_gradients, lr_at, param_groups
from lmforge.train.run_dir import STATE_FILE, RunDir


class ListSource:
    """Global batches cycling through fixed rows; resumable."""

    def __init__(self, data: dict[str, torch.Tensor], global_batch: int) -> None:
        self.data, self.global_batch, self.position = data, global_batch, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = len(next(iter(self.data.values())))
        idx = [(self.position * self.global_batch + i) % rows for i in range(self.global_batch)]
        self.position += 1
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def tiny_model(seed: int = 0) -> Transformer:
    model = Transformer(preset("micro", vocab_size=64, num_hidden_layers=2, max_position_embeddings=64))
    model.init_weights(seed)
    return model


def lm_data(rows: int = 16, length: int = 16, seed: int = 0, ragged: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (rows, length + 1), generator=g)
    labels = tokens[:, 1:].clone()
    if ragged:  # a different number of loss tokens per row, so per-micro-batch means would differ
        for r in range(rows):
            labels[r, : r % 7] = IGNORE
    return {"input_ids": tokens[:, :-1], "labels": labels}


def config(**overrides) -> TrainConfig:
    base = dict(steps=4, micro_batch_size=8, grad_accum=1, lr=1e-2, warmup_steps=1, log_every=1, eval_every=100,
                save_every=100, seed=0, peak_flops=1e12)
    return TrainConfig(**{**base, **overrides})


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---- pure pieces against hand-computed values -------------------------------------------------


@pytest.mark.parametrize("step, expected", [(0, 0.5), (1, 1.0), (2, 1.0), (6, 0.55), (10, 0.1), (25, 0.1)])
def test_warmup_cosine_schedule(step, expected):
    assert lr_at(step, lr=1.0, min_lr=0.1, warmup_steps=2, total_steps=10) == pytest.approx(expected)


def test_weight_decay_only_on_matrices_and_by_hand():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    named = dict(model.named_parameters())
    assert {id(p) for p in decay["params"]} == {id(p) for n, p in named.items() if p.dim() == 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in named.items() if "norm" in n}
    assert no_decay["weight_decay"] == 0.0
    # With zero gradients AdamW's update is the decoupled decay alone: p <- p * (1 - lr * wd).
    before = {n: p.detach().clone() for n, p in named.items()}
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in named.items():
        expected = before[n] * (1 - 0.5 * 0.1) if p.dim() == 2 else before[n]
        torch.testing.assert_close(p.detach(), expected)


def test_clipping_by_global_norm(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, config(grad_clip=0.5), ListSource(lm_data(), 8), causal_lm_loss, tmp_path)
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i + 1))
    norm = math.sqrt(sum(float(i + 1) ** 2 * p.numel() for i, p in enumerate(params)))
    assert clip_gradients(params, trainer.config.grad_clip) == pytest.approx(norm, rel=1e-5)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
    assert clipped == pytest.approx(0.5, rel=1e-4)
    for i, p in enumerate(params):
        assert torch.allclose(p.grad, torch.full_like(p, (i + 1) * 0.5 / norm), rtol=1e-4)


def test_loss_is_token_mean_cross_entropy():
    model = tiny_model()
    data = lm_data(rows=4)
    total, count = causal_lm_loss(model, data)
    logits = model(data["input_ids"])
    mask = data["labels"] != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, data["labels"].clamp(min=0)[..., None])[..., 0]
    assert int(count) == int(mask.sum())
    torch.testing.assert_close(total, -(logp * mask).sum(), rtol=1e-5, atol=1e-4)


# ---- the loop --------------------------------------------------------------------------------


def test_accumulation_gives_the_same_update_as_one_batch(tmp_path):
    results = []
    for micro, accum in [(8, 1), (4, 2), (2, 4)]:
        model = tiny_model()
        # lr 1e-3: Adam normalises each gradient, so fp32 summation-order noise on a near-zero
        # gradient can move a weight by up to ~lr; the invariance itself is exact.
        trainer = Trainer(model, config(micro_batch_size=micro, grad_accum=accum, lr=1e-3), ListSource(lm_data(), 8),
                          causal_lm_loss, tmp_path / f"{micro}x{accum}")
        trainer.run()
        results.append(flat_params(model))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[2], results[0], atol=1e-5, rtol=0)
    assert not torch.equal(results[0], flat_params(tiny_model()))  # training changed something


def padded_data(rows: int = 16, width: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of very different lengths (2 long, the rest short), labels IGNORE past each row."""
    data = lm_data(rows, width, seed)
    for r in range(rows):
        end = width if r in (3, 11) else 4 + r % 5
        data["input_ids"][r, end:] = 0
        data["labels"][r, end:] = IGNORE
    return data


def test_length_groups_split_by_length_and_cut_after_the_last_label():
    data = padded_data()
    groups = length_groups(data)
    assert [g["input_ids"].shape for g in groups] == [(14, 8), (2, 24)]
    assert sorted(len(g["labels"]) for g in groups) == [2, 14]
    # Every labelled token is kept, each row once.
    assert sum(int((g["labels"] != IGNORE).sum()) for g in groups) == int((data["labels"] != IGNORE).sum())
    # Rows of one length: no split, only the padding after the last label cut.
    same = {k: v[:4].clone() for k, v in lm_data(4, 16).items()}
    same["labels"][:, 12:] = IGNORE
    assert [g["input_ids"].shape for g in length_groups(same)] == [(4, 12)]


def test_length_groups_give_the_same_loss_and_gradients_as_the_padded_batch(tmp_path):
    data = padded_data()
    model = tiny_model()
    total, count = causal_lm_loss(model, data)
    total.backward()
    padded = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pieces = [causal_lm_loss(model, piece) for piece in length_groups(data)]
    sum(t for t, _ in pieces).backward()
    assert sum(int(n) for _, n in pieces) == int(count)
    assert float(sum(t for t, _ in pieces)) == pytest.approx(float(total), rel=1e-6)  # fp32 summation order
    for grad, p in zip(padded, model.parameters()):
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-6)

    # The trainer splits every micro-batch and takes the same losses step by step.
    calls = []

    def split(batch):
        calls.append(len(batch["labels"]))
        return length_groups(batch)

    losses = []
    for how in (None, split):
        trainer = Trainer(tiny_model(), config(lr=1e-3, micro_batch_size=8, grad_accum=2), ListSource(data, 16),
                          causal_lm_loss, tmp_path / str(how is None), split=how)
        trainer.run()
        losses.append([r["loss"] for r in trainer.history if "loss" in r])
    assert calls == [8] * 8 and len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_overfits_a_handful_of_sequences(tmp_path):
    model = tiny_model()
    data = lm_data(rows=4, length=16, ragged=False)
    trainer = Trainer(model, config(steps=150, micro_batch_size=4, lr=1e-2, warmup_steps=10, log_every=50),
                      ListSource(data, 4), causal_lm_loss, tmp_path)
    trainer.run()
    with torch.no_grad():
        total, count = causal_lm_loss(model.eval(), data)
    assert float(total / count) < 0.05


class Killed(ListSource):
    """Dies when asked for the 5th batch: with save_every=3, step 4 was logged and step 3 saved."""

    def next_batch(self):
        if self.position == 4:
            raise KeyboardInterrupt
        return super().next_batch()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = config(steps=6, save_every=3, micro_batch_size=4, grad_accum=2)
    straight_model = tiny_model()
    straight = Trainer(straight_model, cfg, ListSource(lm_data(), 8), causal_lm_loss, tmp_path / "straight")
    straight.run()

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model(), cfg, Killed(lm_data(), 8), causal_lm_loss, tmp_path / "resumed").run()
    resumed_model = tiny_model(seed=1)  # different initial weights: everything must come from the checkpoint
    resumed = Trainer(resumed_model, cfg, ListSource(lm_data(), 8), causal_lm_loss, tmp_path / "resumed")
    resumed.run(resume=True)

    assert torch.equal(flat_params(resumed_model), flat_params(straight_model))
    for a, b in zip(straight.optimizer.state.values(), resumed.optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert [p.name for p in RunDir(tmp_path / "resumed").checkpoints()] == ["step-000003", "step-000006"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 1000


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    model = tiny_model()
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        total, count = causal_lm_loss(m, batch)
        return (total * float("nan"), count) if calls["n"] > 2 else (total, count)

    trainer = Trainer(model, config(steps=5, save_every=2), ListSource(lm_data(), 8), loss_fn, tmp_path)
    good = None
    with pytest.raises(TrainingDiverged, match="step 3"):
        trainer.run()
    [good] = RunDir(tmp_path).checkpoints()
    assert good.name == "step-000002"
    reloaded = tiny_model(seed=5)
    Trainer(reloaded, config(steps=2, save_every=2), ListSource(lm_data(), 8), causal_lm_loss, tmp_path).resume()
    assert torch.equal(flat_params(reloaded), flat_params(model))  # the weights were never updated with NaN


def test_resume_from_corrupt_checkpoint_names_it_and_the_good_one(tmp_path):
    trainer = Trainer(tiny_model(), config(steps=4, save_every=2, keep_last=3), ListSource(lm_data(), 8),
                      causal_lm_loss, tmp_path)
    trainer.run()
    newest = RunDir(tmp_path).checkpoints()[-1]
    state = newest / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    again = Trainer(tiny_model(), config(steps=6), ListSource(lm_data(), 8), causal_lm_loss, tmp_path)
    with pytest.raises(ValueError, match="step-000004") as err:
        again.resume()
    assert "step-000002 is intact" in str(err.value)


def test_batch_that_does_not_split_is_an_error(tmp_path):
    trainer = Trainer(tiny_model(), config(micro_batch_size=3), ListSource(lm_data(), 8), causal_lm_loss, tmp_path)
    with pytest.raises(ValueError, match="does not split"):
        trainer.run()


def test_config_rejects_unknown_keys_and_bad_types():
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainConfig(learning_rate=1e-3)
    with pytest.raises(ValidationError, match="steps"):
        TrainConfig(steps="many")


def test_activation_checkpointing_gives_the_same_update(tmp_path):
    results = []
    for checkpointing in (False, True):
        model = tiny_model()
        Trainer(model, config(activation_checkpointing=checkpointing, lr=1e-3), ListSource(lm_data(), 8),
                causal_lm_loss, tmp_path / str(checkpointing)).run()
        results.append(flat_params(model))
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=0)


def test_progress_in_a_log_file_is_one_line_per_logging_interval(tmp_path, capsys):
    """Off a terminal (stderr captured here) the bar draws nothing; each logged step prints one line."""
    trainer = Trainer(tiny_model(), config(steps=6, log_every=2), ListSource(lm_data(), 8), causal_lm_loss, tmp_path)
    trainer.run()
    err = capsys.readouterr().err
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "\r" not in err
    assert err.splitlines() == [f"train {r['step']}/6 loss={r['loss']:.3f} lr={r['lr']:.2e}" for r in logged]
