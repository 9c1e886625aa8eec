"""The one training loop every stage shares; stages differ only in their batches and loss.

Per optimizer step: a global batch is cut into this process's rows and then into micro-batches;
each micro-batch's summed loss is backpropagated, and the summed gradients are divided by the
global count of loss terms, so batch x accumulation x processes splits give the same update.
Then clipping, AdamW, the schedule, logging (metrics.jsonl and the experiment trackers of
`train.loggers`, see `lmforge.train.loggers`), evaluation and atomic checkpoints (resumable)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from lmforge.checkpoint import read_tensors, save_model, to_ours
from lmforge.console import Progress
from lmforge.train.distributed import (
    Dist, all_reduce_sum, barrier, full_state, gradient_sync, load_full_state, unwrap,
)
from lmforge.train.loggers import LOGGERS_HELP, Loggers
from lmforge.train.optim import build_optimizer, clip_gradients, lr_at, set_lr
from lmforge.train.run_dir import STATE_FILE, RunDir, sample_generations

Batch = dict[str, Tensor]
# (sum of loss terms, number of terms) or (sum, number, {name: sum of a metric over the same terms}):
# extra metrics are summed across micro-batches and processes, divided by the count and logged.
LossFn = Callable[[nn.Module, Batch], tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]]


class TrainConfig(BaseModel):
    """Optimisation and bookkeeping settings shared by every stage."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr: float | None = Field(None, ge=0, description="cosine floor; default lr / 10")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)
    save_every: int = Field(100, gt=0)
    keep_last: int = Field(2, gt=0)
    seed: int = 0
    peak_flops: float | None = Field(None, gt=0, description="per-device matmul peak for MFU; measured if unset")
    loggers: Loggers = Field(["jsonl"], description=LOGGERS_HELP)

    @model_validator(mode="after")
    def _floor(self) -> TrainConfig:
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        return self

    def global_batch_size(self, world_size: int) -> int:
        """Rows per optimizer step across all processes."""
        return self.micro_batch_size * self.grad_accum * world_size


class BatchSource(Protocol):
    """Global batches (every tensor's first dimension is the global batch size), resumable."""

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelFiles:
    """How a checkpoint holds the model: a full HF-format directory `model/` (stages that train
    adapters write only the adapter instead; see `lmforge.train.sft.AdapterFiles`)."""

    def save(self, model: nn.Module, out: Path, state: dict[str, Tensor], tokenizer: Any) -> None:
        save_model(unwrap(model), out / "model", tokenizer=tokenizer, state_dict=state)

    def load(self, model: nn.Module, checkpoint: Path) -> dict[str, Tensor] | None:
        """The full state dict to load into `model`, or None when loaded into it in place already."""
        config = unwrap(model).config
        state = to_ours(config.family, read_tensors(checkpoint / "model"), config)
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        return state


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off in a decoder's blocks (`model.model.gradient_checkpointing`);
    a model without that switch (an encoder-decoder) is an error when it is asked for."""
    inner = getattr(model, "model", None)
    if hasattr(inner, "gradient_checkpointing"):
        inner.gradient_checkpointing = enabled
    elif enabled:
        raise ValueError(f"train.activation_checkpointing is not supported for {type(model).__name__} models")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing was written for this step."""


class Trainer:
    """Runs `steps` optimizer steps of `loss_fn` over `source`, writing into `out_dir`."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        source: BatchSource,
        loss_fn: LossFn,
        out_dir: str | Path,
        *,
        env: Dist = Dist(),
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        tokenizer: Any = None,
        flops_per_token: float | None = None,
        files: ModelFiles | None = None,
        split: Callable[[Batch], list[Batch]] | None = None,
        run_config: BaseModel | None = None,
    ) -> None:
        self.config, self.source, self.loss_fn, self.env = config, source, loss_fn, env
        self.run_config = run_config or config  # what the trackers record as the run's hyperparameters
        self.split = split  # a micro-batch into sub-batches the loss sums over exactly (e.g. by length)
        self.files = files or ModelFiles()
        torch.set_flush_denormal(True)  # denormal floats (e.g. in attention backward) slow x86 CPUs several-fold
        self.run_dir = RunDir(out_dir)
        self.evaluate, self.tokenizer, self.flops_per_token = evaluate, tokenizer, flops_per_token
        self.model = model  # already wrapped for DDP/FSDP by the caller, when distributed
        set_activation_checkpointing(unwrap(model), config.activation_checkpointing)
        self.optimizer = build_optimizer(
            model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps
        )
        self.step = 0
        self.forward = torch.compile(model) if config.compile else model
        self.history: list[dict[str, Any]] = []

    # ---- the step ----------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on one global batch; returns loss, grad norm, token count and the
        loss function's extra metrics (means over the same count)."""
        cfg, env = self.config, self.env
        rows = next(iter(batch.values())).shape[0]
        per_rank = rows // env.world_size
        if rows != cfg.global_batch_size(env.world_size):
            raise ValueError(
                f"global batch of {rows} rows does not split into {env.world_size} processes x "
                f"{cfg.grad_accum} micro-batches of {cfg.micro_batch_size}"
            )
        mine = {k: v[env.rank * per_rank : (env.rank + 1) * per_rank] for k, v in batch.items()}
        loss_sum = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        extra: dict[str, Tensor] = {}
        self.model.train()
        for micro in range(cfg.grad_accum):
            part = {k: v[micro * cfg.micro_batch_size : (micro + 1) * cfg.micro_batch_size].to(env.device)
                    for k, v in mine.items()}
            pieces = self.split(part) if self.split else [part]
            for i, piece in enumerate(pieces):
                last = micro == cfg.grad_accum - 1 and i == len(pieces) - 1
                with gradient_sync(self.model, last), self._autocast():
                    total, n, *more = self.loss_fn(self.forward, piece)
                    total.backward()
                loss_sum += total.detach().double().cpu()
                count += float(n)
                for name, value in (more[0] if more else {}).items():
                    extra[name] = extra.get(name, 0.0) + value.detach().double().cpu()
        names = sorted(extra)
        stats = all_reduce_sum(torch.stack([loss_sum, count, *(extra[k] for k in names)]).to(env.device), env).cpu()
        loss_sum, count = float(stats[0]), float(stats[1])
        params = [p for p in self.model.parameters() if p.grad is not None]
        scale = env.world_size / max(count, 1.0)  # data parallelism averaged the per-process sums
        for p in params:
            p.grad.mul_(scale)
        grad_norm = clip_gradients(params, cfg.grad_clip)
        loss = loss_sum / max(count, 1.0)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"step {self.step + 1}: loss {loss} / grad norm {grad_norm} is not finite; stopped before "
                f"updating the weights. The last checkpoint under {self.run_dir.checkpoint_root} is intact; "
                "lower the learning rate or check the data, then resume."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        means = {k: float(v) / max(count, 1.0) for k, v in zip(names, stats[2:])}
        return {"loss": loss, "grad_norm": grad_norm, "tokens": count, **means}

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.env.device.type, enabled=False)

    # ---- the run -----------------------------------------------------------------------------

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train to `config.steps` (continuing from the latest checkpoint if `resume`)."""
        cfg, env = self.config, self.env
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if resume:
            self.resume()
        peak = cfg.peak_flops or (measure_peak_flops() if self.flops_per_token else None)
        bar = Progress(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not env.is_main)
        window_tokens, window_seconds = 0.0, 0.0  # training steps only: evaluation and saving excluded
        loggers = cfg.loggers if env.is_main else []
        with self.run_dir.tracking(loggers, self.run_config, self.step if resume else None):
            while self.step < cfg.steps:
                set_lr(self.optimizer, lr := lr_at(self.step, lr=cfg.lr, min_lr=cfg.min_lr,
                                                  warmup_steps=cfg.warmup_steps, total_steps=cfg.steps))
                start = time.perf_counter()
                result = self.train_step(self.source.next_batch())
                window_seconds += time.perf_counter() - start
                window_tokens += result["tokens"]
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    tokens_per_s = window_tokens / window_seconds
                    record = {"step": self.step, "loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                              "tokens_per_s": tokens_per_s,
                              **{k: v for k, v in result.items() if k not in ("loss", "grad_norm", "tokens")}}
                    if self.flops_per_token and peak:
                        record["mfu"] = tokens_per_s * self.flops_per_token / (peak * env.world_size)
                    self.log(record)
                    bar.set_postfix(loss=f"{result['loss']:.3f}", lr=f"{lr:.2e}")
                    window_tokens, window_seconds = 0.0, 0.0
                if self.evaluate and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    self.log({"step": self.step, **self.evaluate(self.model)})
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        bar.close()
        return self.history[-1] if self.history else {}

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.env.is_main:
            self.run_dir.log(record)

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-N/` (the model's files + `trainer_state.pt`) atomically, keep the
        newest `keep_last`, and refresh the loss curve."""
        model_state, optim_state = full_state(self.model, self.optimizer, self.env)
        path = self.run_dir.checkpoint_root / f"step-{self.step:06d}"
        if self.env.is_main:
            state = {
                "step": self.step,
                "optimizer": optim_state,
                "data": self.source.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            }

            def write(tmp: Path) -> None:
                self.files.save(self.model, tmp, model_state, self.tokenizer)
                torch.save(state, tmp / STATE_FILE)

            path = self.run_dir.save_checkpoint(self.step, write, self.config.keep_last)
            self.run_dir.plot("loss.png")
        barrier(self.env)
        return path

    def resume(self) -> None:
        """Load the newest checkpoint: weights, optimizer, step, data position and RNG states."""
        path, (model_state, state) = self.run_dir.read_latest_checkpoint(
            lambda p: (self.files.load(self.model, p), torch.load(p / STATE_FILE, weights_only=True)))
        load_full_state(self.model, self.optimizer, model_state, state["optimizer"], self.env)
        self.source.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]
        if self.env.is_main:
            self.run_dir.resumed(path, self.step)


def finish_run(trainer: Trainer, config: BaseModel, title: str, started: float, *,
               sample_prompts: Sequence[Sequence[int]] = (), **report: Any) -> None:
    """Write the trained model's files into the run's directory and its `report.md` (main process),
    with greedy generations for `sample_prompts` (unless FSDP shards the weights), then wait for
    every process."""
    state, _ = full_state(trainer.model, None, trainer.env)
    if trainer.env.is_main:
        trainer.files.save(trainer.model, trainer.run_dir.path, state, trainer.tokenizer)
        model = unwrap(trainer.model)
        if sample_prompts and trainer.config.strategy != "fsdp":
            report["samples"] = sample_generations(model, trainer.tokenizer, sample_prompts)
        trainer.run_dir.write_report(title=title, config=config, model=model,
                                     seconds=time.perf_counter() - started, **report)
    barrier(trainer.env)


_PEAK: dict[str, float] = {}


def measure_peak_flops(dtype: torch.dtype = torch.float32, size: int = 2048, rounds: int = 3) -> float:
    """This process's dense matmul FLOP/s (best of a few rounds), measured once per dtype: the MFU denominator."""
    key = str(dtype)
    if key not in _PEAK:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            a @ b
            a @ b
            best = min(best, (time.perf_counter() - start) / 2)
        _PEAK[key] = 2 * size**3 / best
    return _PEAK[key]
