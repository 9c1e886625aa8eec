"""`lmforge sft`: supervised fine-tuning on conversations, fully or parameter-efficiently.

The base is an HF-format model directory; the data are SFT JSONL files (`lmforge.data.chat`),
optionally several mixed by weight; the loss is taken on assistant tokens only; the method
(full, LoRA, QLoRA, prompt tuning, selective) comes from the recipe's `adapter` section. Training
runs in the shared loop (resume, validation, logging). Full and selective fine-tuning write an HF
model to `out_dir/model`; adapter methods write a PEFT adapter to `out_dir/adapter`."""

from __future__ import annotations

import time

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmforge.checkpoint import load_model
from lmforge.config import load_recipe
from lmforge.data.chat import Example, SFTData, collate, pack
from lmforge.data.corpus import Batches
from lmforge.peft.adapters import load_adapter, save_adapter
from lmforge.peft.method import AdapterConfig, apply_method, parameter_counts
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import Dist, init_distributed, unwrap, wrap
from lmforge.report import response_prompts
from lmforge.train.loop import ModelFiles, TrainConfig, Trainer, finish_run
from lmforge.train.losses import causal_lm_loss

ADAPTER_METHODS = ("lora", "qlora", "prompt")


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path
    weight: float = Field(1.0, gt=0, description="share of the training examples drawn from this file")


class SFTDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[DatasetSpec] = Field(min_length=1)
    val_path: Path | None = None
    val_fraction: float = Field(0.05, ge=0, lt=1, description="held out of the first dataset without val_path")
    max_len: int = Field(512, gt=1, description="longest example in tokens (longer ones are cut)")
    packing: bool = False
    eval_batches: int = Field(8, gt=0)


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    base: Path = Field(description="HF-format model directory (with its tokenizer) to fine-tune")
    data: SFTDataConfig
    adapter: AdapterConfig = AdapterConfig(method="lora")
    train: TrainConfig = TrainConfig(steps=200, lr=2e-4, warmup_steps=10, weight_decay=0.0, eval_every=50,
                                     save_every=100)

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.adapter.method != "full" and self.train.strategy == "fsdp":
            raise ValueError("train.strategy fsdp shards full fine-tuning only; use ddp with adapters")
        return self


class MixtureSource:
    """Global batches of examples drawn from several datasets in proportion to their weights;
    each dataset is read in a seeded order, epoch after epoch. Resumable."""

    def __init__(self, datasets: list[list[Example]], weights: list[float], global_batch: int, seed: int,
                 pad_id: int) -> None:
        self.datasets, self.global_batch, self.pad_id = datasets, global_batch, pad_id
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.orders = [Batches(len(d), 1, seed + i) for i, d in enumerate(datasets)]
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> dict[str, Tensor]:
        picks = self.rng.choice(len(self.datasets), size=self.global_batch, p=self.weights)
        return collate([self.datasets[k][self.orders[k].next()[0]] for k in picks], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "orders": [o.state_dict() for o in self.orders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        for order, s in zip(self.orders, state["orders"], strict=True):
            order.load_state_dict(s)


class AdapterFiles(ModelFiles):
    """Checkpoints of adapter training hold the adapter alone, in PEFT's format (`adapter/`)."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def save(self, model: nn.Module, out: Path, state: dict[str, Tensor], tokenizer: Any) -> None:
        save_adapter(unwrap(model), out / "adapter", base=self.base)
        if tokenizer is not None:
            tokenizer.save(out / "adapter")

    def load(self, model: nn.Module, checkpoint: Path) -> None:
        load_adapter(unwrap(model), checkpoint / "adapter")  # fills in the existing adapter's values


def validation_loss(examples: list[Example], batch_size: int, batches: int, pad_id: int, device: torch.device):
    """Evaluator: mean loss over the assistant tokens of the first validation examples."""
    chosen = examples[: batch_size * batches]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        total, count = 0.0, 0
        for start in range(0, len(chosen), batch_size):
            batch = {k: v.to(device) for k, v in collate(chosen[start : start + batch_size], pad_id).items()}
            loss, tokens = causal_lm_loss(model, batch)
            total, count = total + float(loss), count + int(tokens)
        model.train()
        return {"val_loss": total / count, "val_ppl": math.exp(min(total / count, 50.0))}

    return evaluate


def load_data(config: SFTDataConfig, tokenizer: Tokenizer, seed: int) -> tuple[list[list[Example]], list[Example]]:
    """Training examples per dataset (packed if asked) and validation examples."""
    loaded = [SFTData.load(d.path, tokenizer, config.max_len) for d in config.datasets]
    for data in loaded:
        if data.truncated or data.dropped:
            tqdm.write(f"{data.path}: {data.truncated} examples cut to {config.max_len} tokens, "
                       f"{data.dropped} dropped (no assistant token within {config.max_len})")
    train = [data.examples for data in loaded]
    if config.val_path is not None:
        val = SFTData.load(config.val_path, tokenizer, config.max_len).examples
    else:
        order = np.random.default_rng(seed).permutation(len(train[0]))
        n_val = int(len(order) * config.val_fraction)
        val = [train[0][i] for i in order[:n_val]]
        train[0] = [train[0][i] for i in sorted(order[n_val:])]
    if config.packing:
        train = [pack(examples, config.max_len) for examples in train]
    return train, val


def sft(config: SFTConfig, *, resume: bool = False) -> Path:
    """Run supervised fine-tuning; returns the output model or adapter directory."""
    started = time.perf_counter()
    env: Dist = init_distributed()
    cfg = config.train
    tokenizer = Tokenizer.from_dir(config.base)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id or 0
    train, val = load_data(config.data, tokenizer, cfg.seed)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * env.world_size
    for spec, examples in zip(config.data.datasets, train):
        if not examples:
            raise ValueError(f"{spec.path}: no training examples left (packing needs at least {config.data.max_len} "
                             "tokens)")

    model = apply_method(load_model(config.base, dtype=torch.float32), config.adapter, tokenizer).to(env.device)
    trainable, total = parameter_counts(model)
    if env.is_main:
        tqdm.write(f"sft: {config.adapter.method}, {trainable:,} of {total:,} parameters train "
                   f"({100 * trainable / total:.3f}%)")
    adapter = config.adapter.method in ADAPTER_METHODS
    files = AdapterFiles(config.base) if adapter else ModelFiles()
    flops = unwrap(model).config.flops_per_token(config.data.max_len)
    model = wrap(model, cfg.strategy, env)
    trainer = Trainer(
        model, cfg, MixtureSource(train, [d.weight for d in config.data.datasets], global_batch, cfg.seed, pad_id),
        causal_lm_loss, config.out_dir, env=env, tokenizer=tokenizer, flops_per_token=flops, files=files,
        evaluate=validation_loss(val, cfg.micro_batch_size, config.data.eval_batches, pad_id, env.device) if val else None,
    )
    trainer.run(resume=resume)
    finish_run(trainer, config, "Supervised fine-tuning", started, sample_prompts=response_prompts(val or train[0]))
    return config.out_dir / ("adapter" if adapter else "model")


def load_sft_config(path: str | Path, overrides: list[str]) -> SFTConfig:
    return load_recipe(SFTConfig, path, overrides)
