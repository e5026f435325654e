"""Running under torchrun: process group setup, DDP / FSDP wrapping, and the collectives the loop needs.

Without torchrun's environment everything here is a no-op for a single process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def setup(device: str = "auto") -> DistContext:
    """Join torchrun's process group when launched by it (gloo on CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext(device=pick_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, local, dev)


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and tdist.is_initialized():
        tdist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext, fsdp: bool = False) -> nn.Module:
    """DDP (every rank holds the model) or FSDP2 (parameters sharded per block) around `model`."""
    if not ctx.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def maybe_no_sync(model: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        tdist.barrier()


def mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.distributed:
        return value
    value = value.detach().clone()
    tdist.all_reduce(value)
    return value / ctx.world_size


def sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:  # noqa: A001 - the collective's name
    if not ctx.distributed:
        return value
    value = value.detach().clone()
    tdist.all_reduce(value)
    return value


def mean_values(values: list[float], ctx: DistContext) -> list[float]:
    """The mean of each value over the ranks, in one all-reduce (the values themselves for a single process)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    tdist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def optimizer_state(opt: torch.optim.Optimizer, model: nn.Module, ctx: DistContext) -> dict:
    """A full (unsharded) optimizer state dict, gathered to every rank under FSDP."""
    if is_fsdp(model, ctx):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, model: nn.Module, ctx: DistContext) -> None:
    if is_fsdp(model, ctx):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        return
    opt.load_state_dict(state)


def is_fsdp(model: nn.Module, ctx: DistContext) -> bool:
    return ctx.distributed and not hasattr(model, "no_sync")


def full_model(model: nn.Module, ctx: DistContext) -> nn.Module | None:
    """The model with full (unsharded) weights for saving: itself, or under FSDP a CPU copy on rank 0."""
    if not is_fsdp(model, ctx):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(state, assign=True)
    copy.tie_weights()
    copy.reset_buffers()
    return copy


def load_model_state(model: nn.Module, state: dict, ctx: DistContext) -> None:
    """Load full (unsharded) weights into `model`, sharding them under FSDP."""
    if is_fsdp(model, ctx):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(state)
