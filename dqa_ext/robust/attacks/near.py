"""Near misses: per image, the point an attack reached with the smallest margin on the real model
without breaking it.

A trajectory through a twin or a surrogate backward can end a hair short of the decision boundary
of the real, piecewise-constant model, where its gradient says nothing more. The attacks offer each
run's closest point here (Square and the repair too); the repair (repair.py) searches the real model
from it, and the near-miss restarts (anneal.py) start from where the repair ended and from the
gradient attacks' own closest point, half of their starts each: each origin leads to images the
other misses."""
from __future__ import annotations

import torch

GRADIENT, SEARCH = "gradient", "search"  # who offers a point: a gradient attack, or a score-based search


class NearMisses:
    """{test-set index: (real margin, point on the CPU)}, the smallest margin kept, overall and
    among the gradient attacks' points."""

    def __init__(self):
        self._best: dict[int, tuple[float, torch.Tensor]] = {}
        self._gradient: dict[int, tuple[float, torch.Tensor]] = {}

    def offer(self, ids, margins: torch.Tensor, points: torch.Tensor, source: str = GRADIENT) -> None:
        """Keep each image's point where its margin (> 0: still classified right) beats the kept one."""
        if source not in (GRADIENT, SEARCH):
            raise ValueError(f"NearMisses.offer: source must be {GRADIENT!r} or {SEARCH!r}, got {source!r}")
        margins = margins.detach().float().cpu()
        tables = (self._best, self._gradient) if source == GRADIENT else (self._best,)
        for j, (i, m) in enumerate(zip(ids.tolist(), margins.tolist())):
            for table in tables:
                if 0 < m < table.get(int(i), (float("inf"),))[0]:
                    table[int(i)] = (m, points[j].detach().float().cpu().clone())

    def margin(self, i: int) -> float | None:
        kept = self._best.get(int(i))
        return None if kept is None else kept[0]

    def point(self, i: int) -> torch.Tensor | None:
        kept = self._best.get(int(i))
        return None if kept is None else kept[1]

    def gradient_point(self, i: int) -> torch.Tensor | None:
        """The gradient attacks' closest point (the overall one where no gradient attack offered any)."""
        kept = self._gradient.get(int(i))
        return self.point(i) if kept is None else kept[1]

    def __len__(self) -> int:
        return len(self._best)


def near_points(near: NearMisses | None, ids: torch.Tensor, device, *, gradient: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, points): which of the images ``ids`` have a near miss (positions into ids, on the
    CPU) and those points stacked on ``device`` (the gradient attacks' ones with ``gradient``); both
    empty when none has one."""
    have = [j for j, i in enumerate(ids.tolist()) if near is not None and near.point(i) is not None]
    if not have:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    get = near.gradient_point if gradient else near.point
    return torch.tensor(have), torch.stack([get(int(ids[j])) for j in have]).to(device)
