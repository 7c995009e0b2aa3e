"""Several processes under torchrun: join the process group, and give each process its own GPU.

Harvest and SAE training call :func:`join_process_group` themselves, so the same command runs on one process
or under ``torchrun --nproc_per_node N`` (one node) / ``torchrun --nnodes M --node_rank r --rdzv_endpoint host:port``
(several nodes) without a flag. NCCL for CUDA devices, gloo otherwise.
"""
from __future__ import annotations

import os

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
