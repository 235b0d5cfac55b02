"""Near misses: per image, the point a gradient attack reached with the smallest margin on the real
model without breaking it.

A trajectory through a twin or a surrogate backward can end a hair short of the decision boundary
of the real, piecewise-constant model, where its gradient says nothing more. The attacks offer each
run's closest point here, and the repair attack (repair.py) searches the real model from it."""
from __future__ import annotations

import torch


class NearMisses:
    """{test-set index: (real margin, point on the CPU)}, the smallest margin kept."""

    def __init__(self):
        self._best: dict[int, tuple[float, torch.Tensor]] = {}

    def offer(self, ids, margins: torch.Tensor, points: torch.Tensor) -> None:
        """Keep each image's point where its margin (> 0: still classified right) beats the kept one."""
        margins = margins.detach().float().cpu()
        for j, (i, m) in enumerate(zip(ids.tolist(), margins.tolist())):
            if 0 < m < self._best.get(int(i), (float("inf"),))[0]:
                self._best[int(i)] = (m, points[j].detach().float().cpu().clone())

    def margin(self, i: int) -> float | None:
        kept = self._best.get(int(i))
        return None if kept is None else kept[0]

    def point(self, i: int) -> torch.Tensor | None:
        kept = self._best.get(int(i))
        return None if kept is None else kept[1]

    def __len__(self) -> int:
        return len(self._best)


def near_points(near: NearMisses | None, ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, points): which of the images ``ids`` have a near miss (positions into ids, on the
    CPU) and those points stacked on ``device``; both empty when none has one."""
    points = [None if near is None else near.point(i) for i in ids.tolist()]
    have = [j for j, p in enumerate(points) if p is not None]
    if not have:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.tensor(have), torch.stack([points[j] for j in have]).to(device)
