"""Flow-GRPO-Fast's window: w SDE steps at a random start inside a range of the grid (docs/algorithms.md,
"Flow-GRPO-Fast").

FlowGRPO's fast configurations (yifan123/flow_grpo, ``config/grpo.py``: ``sde_window_size``,
``sde_window_range = (0, num_steps // 2)``) roll out with the ODE everywhere except a window of
w consecutive SDE steps, and train exactly those steps. The window's start is drawn uniformly from
``lo .. hi − w`` (both ends included), so the window lies inside steps ``lo .. hi − 1``: with the
default range (0, ⌊T/2⌋) it stays in the high-noise half of the grid.
"""

from __future__ import annotations

import attrs
import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import WindowSchedule
from mixgrpo.core.rollout import keyed_generator
from mixgrpo.core.types import StepPlan
from mixgrpo.core.validators import as_integer, integer, optional_int


def _at_least_one_or_none(instance: object, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, or None for half the grid, got {value}")


@attrs.frozen
class FastWindow(WindowSchedule):
    """A window of w steps at a start l ~ U{lo .. hi − w}, drawn afresh each iteration.

    The draw comes from a generator keyed by the run's ``(seed, iteration)``: every process draws
    the same window and a resumed run draws it again.

    Args:
        window_size (`int`, defaults to 2):
            Number of SDE (and trained) steps w.
        range_start (`int`, defaults to 0):
            lo, the first step a window may contain.
        range_end (`int`, defaults to None):
            hi, one past the last step a window may contain; None: ⌊T/2⌋ (the reference's
            ``num_steps // 2``). ``range_start + window_size <= range_end <= T`` is checked when planning.
    """

    window_size: int = attrs.field(default=2, converter=as_integer, validator=integer(1))
    range_start: int = attrs.field(default=0, converter=as_integer, validator=integer(0))
    range_end: int | None = attrs.field(default=None, converter=optional_int, validator=_at_least_one_or_none)

    def window_range(self, num_steps: int) -> tuple[int, int]:
        """``(lo, hi)`` on a grid of ``num_steps`` steps, checked to hold a window."""
        hi = num_steps // 2 if self.range_end is None else self.range_end
        if hi > num_steps:
            raise ValueError(f"range_end={hi} exceeds num_steps={num_steps}: the window range must lie in the grid")
        if self.range_start + self.window_size > hi:
            raise ValueError(
                f"a window of {self.window_size} steps does not fit in steps {self.range_start}..{hi - 1} "
                f"(range_end={'None, i.e. num_steps // 2' if self.range_end is None else hi}): lower window_size "
                f"or range_start, or raise range_end (at most num_steps={num_steps})"
            )
        return self.range_start, hi

    def window_start(self, iteration: int, num_steps: int, seed: int = 0) -> int:
        """The window start l at ``iteration``: uniform on ``lo .. hi − w``."""
        lo, hi = self.window_range(num_steps)
        gen = keyed_generator(seed, "fast_window", iteration)
        return lo + int(torch.randint(hi - self.window_size - lo + 1, (1,), generator=gen))

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        for name, value, minimum in (("iteration", iteration, 0), ("num_steps", num_steps, 1),
                                     ("num_samples", num_samples, 1)):
            if isinstance(value, bool) or int(value) != value or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        start = self.window_start(iteration, num_steps, seed)
        steps = tuple(range(start, start + self.window_size))
        return StepPlan(num_steps=num_steps, sde_steps=steps, train_steps=steps, window=(start, self.window_size))


@hookimpl
def register_schedules(register):
    register("fast", FastWindow)
