"""Turn a wall-clock budget (--minutes) into a step count, once, so the LR schedule has a length.

The first step is not timed (allocations, compilation); the next steps are timed for
at least `_PROBE_STEPS` steps and 3% of the budget (0.5 s to 30 s). The step count is
then fixed from the measured time per step and the time left, and the run behaves like
a token-budget run from there on (and keeps that count when resumed). If the machine
slows down a lot later, `overdue()` ends the run at 125% of the budget (+5 s) rather than
running on.
"""

from __future__ import annotations

import time

from retrolm.training import distributed
from retrolm.training.distributed import DistInfo

_PROBE_STEPS = 3


class TimeBudget:
    """Probe the step time and convert `minutes` into a total step count (same on all ranks)."""

    def __init__(self, minutes: float, elapsed_before: float, dist: DistInfo):
        self.seconds = minutes * 60.0
        self.elapsed_before = elapsed_before
        self.dist = dist
        self.t_start = time.perf_counter()
        self._t_probe: float | None = None
        self._probe_first_step = 0

    def elapsed(self) -> float:
        """Seconds spent on this run so far, including before a resume."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    @property
    def probe_seconds(self) -> float:
        return min(30.0, max(0.5, 0.03 * self.seconds))

    def after_step(self, step: int) -> int | None:
        """Call after each optimizer step until it returns the total number of steps."""
        now = time.perf_counter()
        if self._t_probe is None:  # the first step of this process is warm-up, not timed
            self._t_probe, self._probe_first_step = now, step
            return None
        timed_steps = step - self._probe_first_step
        ready = timed_steps >= _PROBE_STEPS and now - self._t_probe >= self.probe_seconds
        if distributed.max_across(self.dist, float(ready)) < 1.0:  # all ranks decide together
            return None
        per_step = distributed.max_across(self.dist, (now - self._t_probe) / max(timed_steps, 1))
        left = self.seconds - distributed.max_across(self.dist, self.elapsed())
        return max(step, step + int(left // per_step), 1)

    def overdue(self) -> bool:
        """True once the run is far past its budget (the same answer on every rank)."""
        late = self.elapsed() > 1.25 * self.seconds + 5.0
        return distributed.max_across(self.dist, float(late)) >= 1.0
