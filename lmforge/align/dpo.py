"""`lmforge dpo`: Direct Preference Optimization (Rafailov et al. 2023) on preference pairs.

The policy starts from the SFT model (an HF directory, or an SFT adapter merged into its base)
and trains by the recipe's `adapter` method; the frozen reference is the same model with its
adapters disabled (LoRA, QLoRA, prompt tuning) or a frozen copy (full, selective). With
`precompute_reference` the reference log-probs of every pair are computed once before training,
as TRL can, and ride in the batches: no second forward pass per step. The loss is TRL's `loss_type`
(DPO, IPO or length-normalised DPO), plus, with `rpo_alpha`, that multiple of the policy's NLL of the
chosen responses (RPO). Training runs in the shared loop (resume, logging); validation reports the same
loss and metrics on held-out pairs and the policy's preference accuracy (log pi(chosen) > log
pi(rejected)) beside the reference's."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmforge.align.losses import DPOLossType, dpo_loss, sequence_logprobs
from lmforge.checkpoint import load_model
from lmforge.config import load_recipe
from lmforge.console import Progress
from lmforge.data.chat import IGNORE, collate, padding_id
from lmforge.data.preference import EncodedPair, PreferenceDataConfig, encode_pair, read_pairs
from lmforge.data.hub_datasets import label
from lmforge.data.sampling import SampledSource, holdout_split
from lmforge.peft.adapters import is_adapter_dir, merge_and_save
from lmforge.peft.lora import disable_adapters
from lmforge.peft.method import AdapterConfig, apply_method, parameter_counts
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import Dist, barrier, init_distributed, wrap
from lmforge.train.loop import Batch, LossFn, ModelFiles, TrainConfig, Trainer, finish_run
from lmforge.train.sft import ADAPTER_METHODS, AdapterFiles, check_fsdp_method

Reference = Callable[[Batch], tuple[Tensor, Tensor]]  # batch -> reference log-probs (chosen, rejected)


class DPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    base: Path = Field(description="the SFT model: an HF directory, a LoRA adapter directory (merged in first) "
                                   "or a Hub id")
    data: PreferenceDataConfig
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: assumed label-flip rate "
                                                                   "(logistic losses only)")
    loss_type: DPOLossType = Field("sigmoid", description="TRL's name of the loss: sigmoid (DPO), ipo (IPO: squared, "
                                                          "on log-ratios averaged over each response's tokens; beta "
                                                          "is its tau) or sigmoid_norm (DPO on those averages)")
    rpo_alpha: float | None = Field(None, ge=0, description="RPO: add rpo_alpha x the policy's NLL of the chosen "
                                                            "responses (mean over their tokens) to the loss; the "
                                                            "RPO paper recommends 1.0")
    adapter: AdapterConfig = AdapterConfig(method="lora")
    precompute_reference: bool = Field(True, description="reference log-probs once before training, not per step")
    train: TrainConfig = TrainConfig(steps=200, lr=5e-4, warmup_steps=10, weight_decay=0.0, eval_every=50,
                                     save_every=100)

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        check_fsdp_method(self.adapter, self.train)
        if self.label_smoothing and self.loss_type == "ipo":
            raise ValueError("label_smoothing: conservative DPO smooths the logistic losses (sigmoid, sigmoid_norm), "
                             "not ipo")
        return self


# ---- data ----------------------------------------------------------------------------------------


def load_pairs(path: Path, tokenizer: Tokenizer, max_len: int, kind: str | None, *, split: str = "train",
               columns: Mapping[str, str] | None = None) -> list[EncodedPair]:
    """The pairs of one file or Hub dataset split (of `kind`, if given), encoded; reports how many responses
    were cut."""
    pairs = [p for p in read_pairs(path, split=split, columns=columns) if kind is None or p.kind == kind]
    if not pairs:
        raise ValueError(f"{label(path, split)}: no preference records of kind {kind!r}")
    encoded = [encode_pair(tokenizer, p, max_len) for p in pairs]
    cut = sum(e.chosen.truncated or e.rejected.truncated for e in encoded)
    if cut:
        tqdm.write(f"{label(path, split)}: {cut} of {len(encoded)} pairs have a response cut to fit {max_len} tokens")
    return encoded


def load_data(config: PreferenceDataConfig, tokenizer: Tokenizer, seed: int) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """Training and validation pairs (validation held out of the training file without `val_path`)."""
    train = load_pairs(config.train_path, tokenizer, config.max_len, config.kind, split=config.split,
                       columns=config.columns)
    if config.val_path is not None:
        return train, load_pairs(config.val_path, tokenizer, config.max_len, config.kind, split=config.val_split,
                                 columns=config.columns)
    return holdout_split(train, config.val_fraction, seed)


def response_tokens(pairs: Sequence[EncodedPair]) -> Tensor:
    """(N, 2) number of response tokens (labelled positions) of each pair's chosen and rejected sequence."""
    return torch.tensor([[sum(y != IGNORE for y in e.labels) for e in (p.chosen, p.rejected)] for p in pairs],
                        dtype=torch.float32)


def nll_weights(tokens: Tensor) -> Tensor:
    """(B,) pairs / chosen response tokens of these B pairs (tokens (B, 2)), in every row: summed over
    any rows and divided by B, the weighted NLLs give the token mean over all B chosen responses, so
    micro-batches and processes add up to the whole batch's mean."""
    return torch.full((len(tokens),), len(tokens) / float(tokens[:, 0].sum().clamp(min=1)))


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int, ref: Tensor | None = None) -> Batch:
    """One row per pair: `chosen_*` and `rejected_*` input ids and labels (each right-padded), the
    `response_tokens` (B, 2) and `nll_weight` (B,) of the batch, and `ref_chosen`/`ref_rejected` (B,)
    when the reference log-probs `ref` (B, 2) are given."""
    chosen, rejected = collate([p.chosen for p in pairs], pad_id), collate([p.rejected for p in pairs], pad_id)
    tokens = response_tokens(pairs)
    batch = {"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
             "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
             "response_tokens": tokens, "nll_weight": nll_weights(tokens)}
    if ref is not None:
        batch |= {"ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}
    return batch


def pair_source(pairs: list[EncodedPair], ref: Tensor | None, global_batch: int, seed: int,
                pad_id: int) -> SampledSource:
    """Global batches of pairs in a seeded order, epoch after epoch, with their reference log-probs
    (N, 2) when precomputed. Resumable."""

    def make_batch(rows: list[int]) -> Batch:
        return collate_pairs([pairs[i] for i in rows], pad_id, None if ref is None else ref[rows])

    return SampledSource(len(pairs), make_batch, global_batch, seed)


# ---- log-probabilities and the loss ----------------------------------------------------------------


def _pad(x: Tensor, length: int, value: int) -> Tensor:
    return nn.functional.pad(x, (0, length - x.shape[1]), value=value)


def pair_logprobs(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Summed log-probabilities of the chosen and rejected responses (B,) each, in one forward pass."""
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    length = max(c_ids.shape[1], r_ids.shape[1])
    ids = torch.cat([_pad(c_ids, length, 0), _pad(r_ids, length, 0)])
    labels = torch.cat([_pad(batch["chosen_labels"], length, IGNORE), _pad(batch["rejected_labels"], length, IGNORE)])
    logps = sequence_logprobs(model(ids), labels, labels != IGNORE)
    return logps[: len(c_ids)], logps[len(c_ids) :]


def reward_sums(chosen_reward: Tensor, rejected_reward: Tensor) -> dict[str, Tensor]:
    """Sums over pairs of the implicit-reward metrics (the loop divides them by the number of pairs)."""
    return {"reward_margin": (chosen_reward - rejected_reward).sum(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().sum(),
            "chosen_reward": chosen_reward.sum(), "rejected_reward": rejected_reward.sum()}


def dpo_objective(policy: Tensor, ref: Tensor, tokens: Tensor, nll_weight: Tensor, beta: float,
                  label_smoothing: float = 0.0, loss_type: DPOLossType = "sigmoid",
                  rpo_alpha: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss summed over pairs and the sums of its metrics, from the policy's and the reference's
    summed log-probs and the response token counts (B, 2 each: chosen, rejected). With `rpo_alpha`
    the loss adds that multiple of `nll_loss`, the policy's NLL of the chosen responses: a token
    mean, as TRL's cross-entropy of the chosen tokens, by the rows' `nll_weight` (see `nll_weights`).
    `rpo_alpha` is TRL's name up to 0.28; TRL 0.29+ spells it loss_type ["sigmoid", "sft"] with
    loss_weights [1, rpo_alpha], the same sum."""
    loss, chosen_reward, rejected_reward = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta,
                                                    label_smoothing, loss_type, tokens[:, 0], tokens[:, 1])
    nll = -(policy[:, 0] * nll_weight).sum()
    total = loss * len(policy) + (rpo_alpha * nll if rpo_alpha is not None else 0.0)
    return total, {**reward_sums(chosen_reward, rejected_reward), "nll_loss": nll.detach()}


def dpo_loss_fn(beta: float, label_smoothing: float = 0.0, reference: Reference | None = None,
                loss_type: DPOLossType = "sigmoid", rpo_alpha: float | None = None) -> LossFn:
    """The loop's loss function: (summed `dpo_objective`, number of pairs, metric sums). Reference
    log-probs come with the batch (`ref_chosen`, `ref_rejected`) or from `reference`."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        policy = torch.stack(pair_logprobs(model, batch), dim=1)
        ref = (batch["ref_chosen"], batch["ref_rejected"]) if "ref_chosen" in batch else reference(batch)
        total, sums = dpo_objective(policy, torch.stack(ref, dim=1), batch["response_tokens"], batch["nll_weight"],
                                    beta, label_smoothing, loss_type, rpo_alpha)
        return total, torch.tensor(len(policy)), sums

    return loss_fn


def make_reference(policy: nn.Module, frozen: nn.Module | None) -> Reference:
    """Reference log-probs from `frozen` (a copy of the starting model) or, without one, from the
    policy with its adapters disabled (at the start of training: the policy itself)."""

    @torch.no_grad()
    def reference(batch: Batch) -> tuple[Tensor, Tensor]:
        if frozen is not None:
            return pair_logprobs(frozen, batch)
        with disable_adapters(policy):
            return pair_logprobs(policy, batch)

    return reference


def all_logprobs(fn: Reference, pairs: list[EncodedPair], batch_size: int, pad_id: int, device: torch.device,
                 desc: str | None = None) -> Tensor:
    """(N, 2) log-probabilities of every pair's chosen and rejected response under `fn`."""
    out = []
    for start in Progress(range(0, len(pairs), batch_size), desc=desc, unit="batch", disable=desc is None, leave=False):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[start : start + batch_size], pad_id).items()}
        out.append(torch.stack(fn(batch), dim=1).detach().float().cpu())
    return torch.cat(out)


def preference_accuracy(logps: Tensor) -> float:
    """Fraction of pairs (N, 2) whose chosen response is the more likely one."""
    return float((logps[:, 0] > logps[:, 1]).float().mean())


def validation(pairs: list[EncodedPair], ref: Tensor, config: DPOConfig, pad_id: int, device: torch.device):
    """Evaluator: the training loss and its metrics on the held-out pairs (the NLL a token mean over
    all their chosen responses), the policy's preference accuracy and, for comparison, the reference's."""
    reference_accuracy = preference_accuracy(ref)
    tokens = response_tokens(pairs)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        policy = all_logprobs(lambda batch: pair_logprobs(model, batch), pairs, config.train.micro_batch_size, pad_id,
                              device)
        model.train()
        total, sums = dpo_objective(policy, ref, tokens, nll_weights(tokens), config.beta, config.label_smoothing,
                                    config.loss_type, config.rpo_alpha)
        means = {f"val_{k}": float(v) / len(pairs) for k, v in {"loss": total, **sums}.items()}
        return means | {"val_preference_accuracy": preference_accuracy(policy),
                        "val_reference_preference_accuracy": reference_accuracy}

    return evaluate


# ---- the stage -----------------------------------------------------------------------------------


def model_base(base: Path, out_dir: Path, env: Dist = Dist()) -> Path:
    """`base` if it is a model directory; for a LoRA adapter directory, its base model with the
    adapter merged in, written once to `out_dir/base` (the base new adapters name)."""
    if not is_adapter_dir(base):
        return base
    merged = out_dir / "base"
    if env.is_main and not (merged / "config.json").is_file():
        tqdm.write(f"merging the adapter {base} into {merged}")
        merge_and_save(base, merged)
    barrier(env)
    return merged


def train_dpo(config: DPOConfig, *, resume: bool = False) -> Path:
    """Run DPO; returns the output adapter or model directory."""
    started = time.perf_counter()
    env: Dist = init_distributed()
    cfg = config.train
    base = model_base(config.base, config.out_dir, env)
    tokenizer = Tokenizer.from_dir(base)
    pad_id = padding_id(tokenizer)
    train, val = load_data(config.data, tokenizer, cfg.seed)
    global_batch = cfg.global_batch_size(env.world_size)
    if len(train) < global_batch:
        raise ValueError(f"{config.data.train_path}: {len(train)} training pairs cannot fill one global batch of "
                         f"{global_batch}")

    start = load_model(base, dtype=torch.float32).to(env.device)
    adapter = config.adapter.method in ADAPTER_METHODS
    frozen = None if adapter or config.precompute_reference else copy.deepcopy(start).requires_grad_(False).eval()
    model = apply_method(start, config.adapter, tokenizer).to(env.device)
    trainable, total = parameter_counts(model)
    if env.is_main:
        tqdm.write(f"dpo: {config.adapter.method}, {trainable:,} of {total:,} parameters train "
                   f"({100 * trainable / total:.3f}%), {len(train)} pairs, {len(val)} held out")
    reference = make_reference(model, frozen)  # before any step: the policy is still the reference
    with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        model.eval()
        ref_val = all_logprobs(reference, val, cfg.micro_batch_size, pad_id, env.device, "reference (val)") \
            if val else None
        ref_train = all_logprobs(reference, train, cfg.micro_batch_size, pad_id, env.device, "reference (train)") \
            if config.precompute_reference else None
        model.train()

    files = AdapterFiles(base) if adapter else ModelFiles()
    model = wrap(model, cfg.strategy, env)
    loss_fn = dpo_loss_fn(config.beta, config.label_smoothing, None if config.precompute_reference else reference,
                          config.loss_type, config.rpo_alpha)
    trainer = Trainer(
        model, cfg, pair_source(train, ref_train, global_batch, cfg.seed, pad_id), loss_fn, config.out_dir, env=env,
        tokenizer=tokenizer, files=files, run_config=config,
        evaluate=validation(val, ref_val, config, pad_id, env.device) if val else None,
    )
    trainer.run(resume=resume)
    finish_run(trainer, config, "DPO", started, sample_prompts=[p.prompt_ids for p in (val or train)[:4]])
    return config.out_dir / ("adapter" if adapter else "model")


def load_dpo_config(path: str | Path, overrides: list[str]) -> DPOConfig:
    return load_recipe(DPOConfig, path, overrides)
