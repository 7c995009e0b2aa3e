"""`--device` for every benchmark: the flag, the clock's synchronisation, and what the device is.

A benchmark adds the flag with `add_device_arg(parser)`, loads its model with `device=args.device`, moves its
inputs there, calls `sync(device)` before reading the clock (CUDA runs asynchronously: without it a timer
measures the launch, not the work) and records `device_info(device)` in its figures.
"""

from __future__ import annotations

import argparse

import torch


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device to run on: cpu (default), cuda, cuda:1, ...")


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device) -> dict:
    """The device in the figures: its name, and for CUDA the card, its memory and the peak this run allocated."""
    d = torch.device(device)
    info: dict = {"device": str(d)}
    if d.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(d)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(d) / 2**30, 3),
        }
    return info
