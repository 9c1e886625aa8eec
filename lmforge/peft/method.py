"""How the SFT stage fine-tunes: the `AdapterConfig` section of a recipe and `apply_method`."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lmforge.model import Transformer
from lmforge.peft.ia3 import IA3_FEEDFORWARD, IA3_TARGETS, add_ia3
from lmforge.peft.lora import ATTENTION, add_lora
from lmforge.peft.prompt_tuning import PromptInit, prompt_tuning
from lmforge.peft.saved_modules import add_modules_to_save
from lmforge.peft.selective import train_only
from lmforge.peft.tokens import add_trainable_tokens, input_and_output
from lmforge.seq2seq import Seq2SeqEncoder

SEQ2SEQ_LORA_TARGETS = ("q", "v")  # PEFT's default LoRA targets for T5


class AdapterConfig(BaseModel):
    """Fine-tuning method and its settings. `full` trains everything; `lora`/`qlora` train
    low-rank adapters on `targets` (default q_proj, k_proj, v_proj, o_proj; an encoder-decoder's q, v,
    as PEFT's T5 default) (QLoRA over an NF4 base; DoRA with `dora`); `ia3` trains (IA)³
    vectors on `targets` (default k_proj, v_proj, down_proj); `prompt` trains a soft prompt;
    `selective` trains the parameters `patterns` and `layers` pick."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["full", "lora", "qlora", "ia3", "prompt", "selective"] = "full"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | Literal["all-linear"] = list(ATTENTION)
    rslora: bool = False
    dora: bool = Field(False, validation_alias=AliasChoices("dora", "use_dora"),
                       description="lora/qlora: weight-decomposed LoRA (DoRA), PEFT's use_dora")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="lora: r of the modules a regex key matches at a name's end (PEFT's rule)")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="lora: alpha per module, as rank_pattern")
    modules_to_save: list[str] = Field(
        default_factory=list, description="lora/ia3: modules trained as full copies (e.g. lm_head), chosen by "
        "name suffix as PEFT does")
    feedforward_modules: list[str] | None = Field(
        None, description="ia3: targets whose input is scaled (default down_proj); the others' output is")
    num_virtual_tokens: int = Field(20, gt=0)
    prompt_init: PromptInit = "random"
    prompt_init_text: str | None = None
    patterns: list[str] = Field(default_factory=list, description="regexes or groups: norms, biases, embeddings, head")
    layers: list[int] = Field(default_factory=list, description="block indices to train; -1 is the last")
    trainable_tokens: list[str | int] = Field(
        default_factory=list, description="with LoRA: tokens (strings or ids) whose embedding and output rows train, "
        "e.g. a chat template's markers the base never saw (PEFT's trainable_token_indices)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        if self.prompt_init == "text" and not self.prompt_init_text:
            raise ValueError("prompt_init 'text' needs prompt_init_text")
        if self.method == "selective" and not (self.patterns or self.layers):
            raise ValueError("method 'selective' needs patterns and/or layers")
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError("targets is empty")
        if self.trainable_tokens and self.method not in ("lora", "qlora"):
            raise ValueError(f"trainable_tokens goes with method lora or qlora, not {self.method!r}")
        lora_only = [k for k in ("dora", "rank_pattern", "alpha_pattern") if getattr(self, k)]
        if lora_only and self.method not in ("lora", "qlora"):
            raise ValueError(f"{lora_only[0]} goes with method lora or qlora, not {self.method!r}")
        if self.modules_to_save and self.method not in ("lora", "qlora", "ia3"):
            raise ValueError(f"modules_to_save goes with method lora, qlora or ia3, not {self.method!r}")
        if self.feedforward_modules is not None and self.method != "ia3":
            raise ValueError(f"feedforward_modules goes with method ia3, not {self.method!r}")
        if self.method == "ia3" and "targets" not in self.model_fields_set:
            self.targets = list(IA3_TARGETS)
        if self.method == "ia3" and self.feedforward_modules is None:
            self.feedforward_modules = [m for m in IA3_FEEDFORWARD if self.targets == "all-linear" or m in self.targets]
        return self


def for_model(cfg: AdapterConfig, model: nn.Module) -> AdapterConfig:
    """`cfg` with an encoder-decoder's own default LoRA targets where the recipe names none; an error
    for the settings that only a decoder-only model has (block `layers`, trainable token rows)."""
    if not isinstance(model, Seq2SeqEncoder):
        return cfg
    if cfg.trainable_tokens:
        raise ValueError("adapter.trainable_tokens is for decoder-only models (embed_tokens and lm_head rows)")
    if cfg.layers:
        raise ValueError("adapter.layers numbers a decoder-only model's blocks; for an encoder-decoder use "
                         r"patterns such as 'decoder\.block\.1\.'")
    if cfg.method in ("lora", "qlora") and "targets" not in cfg.model_fields_set:
        return cfg.model_copy(update={"targets": list(SEQ2SEQ_LORA_TARGETS)})
    return cfg


def apply_method(model: Transformer | Seq2SeqEncoder, cfg: AdapterConfig, tokenizer: Any = None) -> nn.Module:
    """Prepare `model` (a decoder or an encoder-decoder) for fine-tuning by `cfg.method`: set what trains,
    add adapters. Returns the model to train (the same object, or a soft-prompt wrapper). `tokenizer` (with
    `encode`) is needed for a text-initialised soft prompt only."""
    cfg = for_model(cfg, model)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.method == "full":
        return model.requires_grad_(True)
    if cfg.method in ("lora", "qlora"):
        add_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets, rslora=cfg.rslora,
                 dora=cfg.dora, rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern,
                 quantize=cfg.method == "qlora", generator=generator)
        if cfg.trainable_tokens:
            add_trainable_tokens(model, input_and_output(model, token_ids(cfg.trainable_tokens, tokenizer)))
        return add_modules_to_save(model, cfg.modules_to_save)
    if cfg.method == "ia3":
        add_ia3(model, targets=cfg.targets, feedforward=cfg.feedforward_modules)
        return add_modules_to_save(model, cfg.modules_to_save)
    if cfg.method == "prompt":
        ids = None
        if cfg.prompt_init == "text":
            if tokenizer is None:
                raise ValueError("prompt_init 'text' needs the tokenizer")
            ids = tokenizer.encode(cfg.prompt_init_text, add_bos=bool(tokenizer.config.get("add_bos_token", False)))
        return prompt_tuning(model, cfg.num_virtual_tokens, cfg.prompt_init, init_ids=ids,
                             init_text=cfg.prompt_init_text, generator=generator)
    train_only(model, cfg.patterns, cfg.layers)
    return model


def token_ids(tokens: list[str | int], tokenizer: Any) -> list[int]:
    """Ids of `tokens`: ids as they are, strings looked up as single tokens of the vocabulary."""
    if any(isinstance(t, str) for t in tokens) and tokenizer is None:
        raise ValueError("trainable_tokens given as strings need the tokenizer")
    ids = []
    for token in tokens:
        token_id = tokenizer.token_to_id(token) if isinstance(token, str) else token
        if token_id is None:
            raise ValueError(f"trainable_tokens: {token!r} is not one token of the vocabulary")
        ids.append(token_id)
    return ids


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should hold (those with requires_grad)."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameter values (an NF4 weight counts its logical size)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
