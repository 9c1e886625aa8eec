"""torchrun processes: DDP or FSDP2 (`fully_shard`), NCCL on GPU and gloo on CPU.

A single process is the degenerate case (world size 1) and needs no launcher."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from lmforge.seq2seq import Seq2SeqEncoder

Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    """Join the process group torchrun described in the environment (or run alone without one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world_size, local_rank, device)


def leave_process_group() -> None:
    """Destroy the process group if this process joined one (PyTorch asks for it before exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: Strategy, env: Dist) -> nn.Module:
    """Wrap `model` for data-parallel training: DDP replicas, or FSDP2 sharding each block then the root."""
    if not env.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one before the root: a decoder's blocks; an encoder-decoder's blocks,
    or their sub-layers where a block holds weights the model reads outside the block's forward pass: the
    relative-position bias table (the stack reads it before its blocks run) and the cross-attention (its keys
    and values over the encoder output are computed once, before the decoder runs). Those stay with the root,
    gathered through the whole forward pass."""
    if not isinstance(model, Seq2SeqEncoder):
        return list(model.model.layers)
    stacks = [model.encoder] + ([model.decoder] if hasattr(model, "decoder") else [])
    units: list[nn.Module] = []
    for block in (block for stack in stacks for block in stack.block):
        kept = [layer for layer in block.layer if not read_outside(layer)]
        units += [block] if len(kept) == len(block.layer) else kept
    return units


def read_outside(layer: nn.Module) -> bool:
    """Whether an encoder-decoder's sub-layer holds weights read outside its forward pass (see `shard_units`)."""
    return hasattr(layer, "EncDecAttention") or any(name.endswith("relative_attention_bias")
                                                    for name, _ in layer.named_modules())


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync"):  # DDP
        with nullcontext() if enabled else model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def all_reduce_sum(value: torch.Tensor, env: Dist) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, env: Dist) -> tuple[dict, dict | None]:
    """Unsharded model and optimizer state dicts (on CPU), gathered for rank 0 to write."""
    if not env.enabled:
        return model.state_dict(), optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(unwrap(model), optimizer or [], options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict | None,
                    optimizer_state: dict | None, env: Dist) -> None:
    """Load unsharded state dicts into a (possibly sharded) model and its optimizer; a None
    `model_state` leaves the model's weights as they are."""
    if not env.enabled:
        if model_state is not None:
            model.load_state_dict(model_state)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if model_state is None:
        model_state = get_state_dict(unwrap(model), [], options=StateDictOptions(full_state_dict=True))[0]
    set_state_dict(unwrap(model), optimizer or [], model_state_dict=model_state,
                   optim_state_dict=optimizer_state or {}, options=StateDictOptions(full_state_dict=True))


def barrier(env: Dist) -> None:
    if env.enabled:
        dist.barrier()

