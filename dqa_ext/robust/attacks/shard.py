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

from dataclasses import dataclass

import torch

from ..distributed import join, world_from_env


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


def shard_from_env(device: torch.device) -> tuple[Shard, torch.device]:
    """Under torchrun: this rank's shard and device, after joining the process group
    (distributed.join). Else (Shard(), device)."""
    device = join(device)
    if world_from_env()[0] <= 1:
        return Shard(), device
    import torch.distributed as dist

    return Shard(dist.get_rank(), dist.get_world_size()), device
