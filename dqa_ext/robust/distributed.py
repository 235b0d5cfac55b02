"""The process group under torchrun, for training (DDP) and the sharded evaluation alike: who this
process is, joining the group (NCCL on CUDA, else gloo) and leaving it."""

from __future__ import annotations

import os
from datetime import timedelta

import torch

# Ranks wait for each other at the evaluation's gathers while one of them runs a long attack (ZOO,
# the substitute): far longer than NCCL's default 10 minutes.
TIMEOUT = timedelta(hours=12)


def world_from_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) outside it."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def join(device: torch.device) -> torch.device:
    """Under torchrun: joins the process group unless already in one, and returns this rank's
    device (cuda:LOCAL_RANK for a CUDA run: put the models there, after this call). Else ``device``."""
    world, _, local = world_from_env()
    if world <= 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def leave_process_group() -> None:
    """Waits for every rank, then leaves the process group (if this process joined one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
