"""Several processes under torchrun: join the process group, give each process its own GPU, average gradients.

Harvest and SAE training call :func:`join_process_group` themselves, so the same command runs on one process
or under ``torchrun --nproc_per_node N`` (one node) / ``torchrun --nnodes M --node_rank r --rdzv_endpoint host:port``
(several nodes) without a flag. NCCL for CUDA devices, gloo otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str | torch.device | None) -> str | torch.device | None:
    """A bare ``"cuda"`` under torchrun means this process's own GPU (``cuda:LOCAL_RANK``); other values pass."""
    if str(device) == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def join_process_group(device: str | torch.device = "cpu") -> tuple[int, int]:
    """(world size, rank), joining the group first when torchrun started this process and nobody has yet."""
    if not dist.is_available() or (not launched_by_torchrun() and not dist.is_initialized()):
        return 1, 0
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(local_device(str(device)) if str(device) == "cuda" else device))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size(), dist.get_rank()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group already running, (0, 1) when there is none; never joins one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the ranks, so N ranks follow one process's trajectory.

    The gradients are flattened into one buffer per dtype and device and all-reduced together (one collective,
    not one per tensor). Parameters without a gradient are skipped, so every rank must hold gradients for the
    same parameters. A no-op in one process.
    """
    n = rank_and_world()[1]
    if n == 1:
        return
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= n
        off = 0
        for g in grads:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()
