"""Where a long evaluation is, and how long it has left.

The work is counted in units that estimate each attack's cost (forward-backward passes per image,
from its budget; AttackSpec.cost), planned up front for every model and attack, and cut down as the
cascade leaves fewer images to attack. On a terminal a bar shows the share done and the time left;
elsewhere (a log file, a pipe) every finished step prints its line with the same two numbers.
"""
from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    def __init__(self, total: float, *, log=print, bar: bool | None = None, file=None, clock=time.monotonic):
        self.total, self.done = float(total), 0.0
        self.log, self.clock = log, clock
        self.start = clock()
        file = file if file is not None else sys.stderr
        self.bar = None
        if bar if bar is not None else file.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max(1.0, self.total), file=file, leave=False, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def doing(self, what: str) -> None:
        """Name the step now running (on the bar)."""
        if self.bar is not None:
            self.bar.set_description_str(what, refresh=True)

    def replan(self, delta: float) -> None:
        """Less (or more) work than planned is left: the cascade found fewer survivors."""
        self.total = max(self.done, self.total + delta)
        if self.bar is not None:
            self.bar.total = max(1.0, self.total)
            self.bar.refresh()

    def left(self) -> str:
        share = self.done / self.total if self.total > 0 else 1.0
        elapsed = self.clock() - self.start
        if share <= 0:
            return f"{100 * share:.0f}% done"
        return f"{100 * share:.0f}% done, ~{_duration(elapsed * (1 - share) / share)} left"

    def advance(self, units: float, line: str | None = None) -> None:
        """A step finished: count its units and print its line (with the share done and the time left
        when there is no bar)."""
        self.done = min(self.total, self.done + units)
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.refresh()
            if line is not None:
                self.bar.write(line)
        elif line is not None:
            self.log(f"{line} [{self.left()}]")

    def say(self, line: str) -> None:
        """A line that is not a step (a header, a result)."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Silent(Progress):
    """No output at all (tests, callers that log themselves)."""

    def __init__(self):
        super().__init__(1.0, log=lambda *_: None, bar=False)
