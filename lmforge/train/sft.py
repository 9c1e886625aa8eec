"""`lmforge sft`: supervised fine-tuning on conversations, fully or parameter-efficiently.

The base is an HF-format model directory; the data are SFT JSONL files (`lmforge.data.chat`),
optionally several mixed by weight; the loss is taken on assistant tokens only. A base whose config.json
names an encoder-decoder (T5, FLAN-T5) trains on (input, target) pairs instead (`sft_seq2seq`). The method
(full, LoRA/DoRA, QLoRA, (IA)³, prompt tuning, selective) comes from the recipe's `adapter` section. Training
runs in the shared loop (resume, validation, logging). Full and selective fine-tuning write an HF
model to `out_dir/model`; adapter methods write a PEFT adapter to `out_dir/adapter`."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmforge.checkpoint import load_model
from lmforge.config import load_recipe
from lmforge.data.chat import Example, SFTData, collate, length_groups, pack, padding_id, response_prompts
from lmforge.data.hub_datasets import DataSource, label
from lmforge.data.sampling import MixtureSource, holdout_split
from lmforge.data.seq2seq import Seq2SeqDataConfig
from lmforge.peft.adapters import load_adapter, save_adapter
from lmforge.peft.method import AdapterConfig, apply_method, for_model, parameter_counts
from lmforge.seq2seq_checkpoint import is_seq2seq, load_seq2seq
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import Dist, init_distributed, unwrap, wrap
from lmforge.train.loop import ModelFiles, TrainConfig, Trainer, finish_run
from lmforge.train.losses import causal_lm_loss, seq2seq_lm_loss, validation_loss
from lmforge.train.sft_seq2seq import (
    Seq2SeqModelFiles, check_data_kind, data_for_base, data_kind, seq2seq_batches,
)

ADAPTER_METHODS = ("lora", "qlora", "ia3", "prompt")


def check_fsdp_method(adapter: AdapterConfig, train: TrainConfig) -> None:
    """FSDP shards full fine-tuning only: adapters train under DDP."""
    if adapter.method != "full" and train.strategy == "fsdp":
        raise ValueError("train.strategy fsdp shards full fine-tuning only; use ddp with adapters")


class DatasetSpec(DataSource):
    weight: float = Field(1.0, gt=0, description="share of the training examples drawn from this dataset")


class SFTDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[DatasetSpec] = Field(min_length=1)
    val_path: Path | None = Field(None, description="validation conversations: a JSONL file or a Hub dataset "
                                                    "(its val_split, read with the first dataset's columns)")
    val_split: str = Field("test", description="the split of a Hub dataset val_path")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="held out of the first dataset without val_path")
    max_len: int = Field(512, gt=1, description="longest example in tokens (longer ones are cut)")
    packing: bool = False
    eval_batches: int = Field(8, gt=0)


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    base: Path = Field(description="HF-format model directory (with its tokenizer) or Hub id to fine-tune")
    data: Annotated[Annotated[SFTDataConfig, Tag("SFTDataConfig")] | Annotated[Seq2SeqDataConfig, Tag("Seq2SeqDataConfig")],
                    Discriminator(data_kind)] = Field(
        description="a decoder's conversations (max_len, packing) or an encoder-decoder's pairs (max_source_len, "
        "max_target_len, per-dataset prefix), as the base's config.json says")
    adapter: AdapterConfig = AdapterConfig(method="lora")
    train: TrainConfig = TrainConfig(steps=200, lr=2e-4, warmup_steps=10, weight_decay=0.0, eval_every=50,
                                     save_every=100)

    @field_validator("data", mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        check_data_kind(data)
        return data

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        check_fsdp_method(self.adapter, self.train)
        return self


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


def validation_batches(examples: list[Example], batch_size: int, batches: int, pad_id: int) -> list[dict[str, Tensor]]:
    """The first `batches` batches of validation examples."""
    chosen = examples[: batch_size * batches]
    return [collate(chosen[start : start + batch_size], pad_id) for start in range(0, len(chosen), batch_size)]


def load_data(config: SFTDataConfig, tokenizer: Tokenizer, seed: int) -> tuple[list[list[Example]], list[Example]]:
    """Training examples per dataset (packed if asked) and validation examples."""
    loaded = [SFTData.load(d.path, tokenizer, config.max_len, split=d.split, columns=d.columns)
              for d in config.datasets]
    for data in loaded:
        if data.truncated or data.dropped:
            tqdm.write(f"{data.path}: {data.truncated} examples cut to {config.max_len} tokens, "
                       f"{data.dropped} dropped (no assistant token within {config.max_len})")
    train = [data.examples for data in loaded]
    if config.val_path is not None:
        val = SFTData.load(config.val_path, tokenizer, config.max_len, split=config.val_split,
                           columns=config.datasets[0].columns).examples
    else:
        train[0], val = holdout_split(train[0], config.val_fraction, seed)
    if config.packing:
        train = [pack(examples, config.max_len) for examples in train]
    return train, val


def sft(config: SFTConfig, *, resume: bool = False) -> Path:
    """Run supervised fine-tuning; returns the output model or adapter directory."""
    started = time.perf_counter()
    env: Dist = init_distributed()
    cfg = config.train
    seq2seq = is_seq2seq(config.base)
    data = data_for_base(config.data, seq2seq, config.base, SFTDataConfig)
    tokenizer = Tokenizer.from_dir(config.base)
    if seq2seq:
        base = load_seq2seq(config.base, dtype=torch.float32)
        source, val_batches, prompts = seq2seq_batches(data, tokenizer, base.config, cfg, env.world_size)
        loss_fn, flops = seq2seq_lm_loss, None  # no FLOPs/token (MFU) formula for an encoder-decoder yet
    else:
        source, val_batches, prompts = causal_batches(data, tokenizer, cfg, env.world_size)
        base = load_model(config.base, dtype=torch.float32)
        loss_fn, flops = causal_lm_loss, base.config.flops_per_token(data.max_len)

    config = config.model_copy(update={"adapter": for_model(config.adapter, base)})  # the report shows what ran
    model = apply_method(base, config.adapter, tokenizer).to(env.device)
    trainable, total = parameter_counts(model)
    if env.is_main:
        tqdm.write(f"sft: {config.adapter.method}, {trainable:,} of {total:,} parameters train "
                   f"({100 * trainable / total:.3f}%)")
    adapter = config.adapter.method in ADAPTER_METHODS
    files = AdapterFiles(config.base) if adapter else Seq2SeqModelFiles() if seq2seq else ModelFiles()
    model = wrap(model, cfg.strategy, env)
    evaluate = validation_loss(val_batches, env.device, loss_fn) if val_batches else None
    trainer = Trainer(model, cfg, source, loss_fn, config.out_dir, env=env, tokenizer=tokenizer,
                      flops_per_token=flops, files=files, evaluate=evaluate,
                      split=None if seq2seq or data.packing else length_groups, run_config=config)
    trainer.run(resume=resume)
    finish_run(trainer, config, "Supervised fine-tuning", started, sample_prompts=prompts)
    return config.out_dir / ("adapter" if adapter else "model")


def causal_batches(data: SFTDataConfig, tokenizer: Tokenizer, cfg: TrainConfig,
                   world_size: int) -> tuple[MixtureSource, list[dict[str, Tensor]], list[list[int]]]:
    """Training batches, validation batches and sample prompts of conversations for a decoder."""
    pad_id = padding_id(tokenizer)
    train, val = load_data(data, tokenizer, cfg.seed)
    for spec, examples in zip(data.datasets, train):
        if not examples:
            raise ValueError(f"{label(spec.path, spec.split)}: no training examples left (packing needs at least "
                             f"{data.max_len} tokens)")
    source = MixtureSource(train, [d.weight for d in data.datasets], partial(collate, pad_id=pad_id),
                           cfg.global_batch_size(world_size), cfg.seed)
    batches = validation_batches(val, cfg.micro_batch_size, data.eval_batches, pad_id) if val else []
    return source, batches, response_prompts(val or train[0])


def load_sft_config(path: str | Path, overrides: list[str]) -> SFTConfig:
    return load_recipe(SFTConfig, path, overrides)
