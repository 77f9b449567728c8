"""Devices, precision and data parallelism.

Launched by `torchrun` (WORLD_SIZE > 1 in the environment) the trainer joins a process group
(NCCL on CUDA, gloo on CPU) and wraps the model in DDP, or, with `train.fsdp=true`, shards it with
FSDP2 (`torch.distributed.fsdp.fully_shard`: one unit per decoder layer plus the root, so a model
that does not fit one GPU trains across several). Rank 0 alone logs and writes checkpoints;
every rank runs the same steps on its share of each global batch."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dynlm.errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False  # this run joined it, so this run leaves it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int = 0, what: str = "train.device") -> torch.device:
    """"auto" picks CUDA, then MPS, then CPU; a plain "cuda" means this process's GPU. `what`
    names the setting in errors ("train.device", "--device")."""
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", spec):
        raise ConfigError(f"{what} '{spec}' is not a device dynlm runs on", "use auto, cpu, cuda, cuda:N or mps")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} is '{spec}' but CUDA is not available", "use auto or cpu")
        if spec != "cuda" and int(spec[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"{what} is '{spec}' but there are {torch.cuda.device_count()} CUDA devices")
        return torch.device(f"cuda:{local_rank}") if spec == "cuda" else torch.device(spec)
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{what} is 'mps' but MPS is not available", "use auto or cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 autocast on CUDA (when supported), float32 on CPU and MPS."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision region for the forward pass (a no-op in float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup(device_spec: str) -> DistContext:
    """Join the process group when launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    joined = False
    if world_size > 1 and not dist.is_initialized():
        joined = True
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast
        torch.backends.cudnn.allow_tf32 = True
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                       owns_process_group=joined)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def settle(ctx: DistContext) -> None:
    """The end of a run's collectives: a barrier, then a second one. gloo's worker thread frees
    each finished operation (and the tensors it held, which needs the GIL) after completing it;
    a process group destroyed under the GIL meanwhile waits for that thread, which waits for the
    GIL: the second rank of 1 in ~6 two-process CPU runs hung at exit. The second barrier runs
    only once the thread has let go of everything before it, and holds no tensor itself."""
    barrier(ctx)
    barrier(ctx)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object, ctx: DistContext) -> list[object]:
    """Every rank's `obj` (small, JSON-like values such as RNG states), in rank order."""
    if not ctx.distributed:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, ctx: DistContext, fsdp: bool, *, bucket_cap_mb: float = 25.0,
               reshard_after_forward: bool = True,
               param_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The module the training loop calls: the model itself, DDP around it, or the model sharded
    in place by FSDP2 (then the returned module is the model).

    DDP: gradients are views into its communication buckets (no copy per step); each bucket of
    `bucket_cap_mb` is all-reduced as soon as backward has filled it, overlapping the rest of
    backward. (Not `static_graph`: its first step all-reduces through hooks on the output's
    tensors, which DDP cannot find in a ModelOutput, so the ranks' first gradients stay unsynced.)
    FSDP2: one unit per decoder layer plus the root. `reshard_after_forward=False` keeps each
    layer's gathered parameters from forward to backward, as the root's always are (one
    all-gather per layer and step instead of two, for the memory of the full parameters);
    `param_dtype` is the dtype they are gathered and computed in, `reduce_dtype` the one gradients
    are reduce-scattered in (the sharded master weights and the optimizer stay float32)."""
    if fsdp:
        if not ctx.distributed:
            raise ConfigError("train.fsdp=true needs several processes", "launch with torchrun --nproc_per_node N")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        layers = getattr(getattr(model, "model", None), "layers", None)
        for layer in layers if layers is not None else []:
            fully_shard(layer, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        # the root keeps its parameters (embedding, final norm, LM head) gathered from forward to
        # backward, FSDP2's default for a root: backward needs them first thing. Made to reshard
        # like the layers, it faulted (illegal memory access) in the first backward on two H200s
        fully_shard(model, mp_policy=policy)
        return model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                       bucket_cap_mb=bucket_cap_mb)
    return model
