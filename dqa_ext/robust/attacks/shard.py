"""Sharded evaluation under torchrun: which images and which whole attacks a rank takes, and the
gathering of what the ranks found.

Per-example attacks (the adaptive cascade, its reruns, the sanity check, the epsilon sweep, the
transfer candidates) split the images: rank r attacks images r, r + world, ... Their randomness is
keyed by the image's index in the test set, never by the rank, so each image meets the same attack
as in one process. The paper's attacks (ART's, seeded once per attack over the whole prefix) are
split whole instead: each runs on one rank over all its images. Every rank gets every result back
(all_gather_object), so the worst case and the checks are computed alike everywhere; only rank 0
writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def images(self, n: int) -> torch.Tensor:
        """This rank's images among 0..n-1: every world-th one, so that easy and hard images (and
        the survivors of each attack) spread evenly over the ranks."""
        return torch.arange(self.rank, n, self.world)

    def tasks(self, names) -> list:
        """This rank's whole tasks among ``names`` (in order)."""
        return list(names)[self.rank::self.world]

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# Ranks wait for each other at each gather while one of them runs a long attack (ZOO, the
# substitute): far longer than NCCL's default 10 minutes.
TIMEOUT = timedelta(hours=12)


def world_from_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) outside it."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def shard_from_env(device: torch.device) -> tuple[Shard, torch.device]:
    """Under torchrun: joins the process group (NCCL on CUDA, else gloo) unless already in one, and
    returns this rank's shard and device (cuda:LOCAL_RANK for a CUDA run: load the models there,
    after this call). Else (Shard(), device)."""
    world, rank, local = world_from_env()
    if world <= 1:
        return Shard(), device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Shard(dist.get_rank(), dist.get_world_size()), device


def leave_process_group() -> None:
    """Waits for every rank, then leaves the process group (if this process joined one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
