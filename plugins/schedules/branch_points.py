"""TempFlow-GRPO's plan: the branch steps of a trunk rollout (docs/algorithms.md, "TempFlow-GRPO").

The reference (Shredded-Pork/TempFlow-GRPO, ``scripts/train_flux_pr.py`` @ 28a9b9b with
``flow_grpo/diffusers_patch/flux_pipeline_with_logprob_perstep.py``) walks each initial noise with the
ODE and, at every step of the grid, draws ``exploration_k = 6`` SDE samples off it, each finished with
the ODE; it trains steps ``0 .. int(0.99·T) − 1`` (``timestep_fraction = 0.99``), each on the samples
that branched there.
"""

from __future__ import annotations

import math

import attrs

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import WindowSchedule
from mixgrpo.core.types import StepPlan
from mixgrpo.core.validators import as_int_tuple, as_integer, increasing_integers, integer


@attrs.frozen
class BranchPoints(WindowSchedule):
    """A trunk per group with ``branches`` samples leaving it at each branch step (``core/trunk.py``).

    Args:
        branch_steps (`tuple[int, ...]`, defaults to None):
            The steps at which samples leave the trunk (each one SDE step, then the ODE); None: steps
            ``0 .. ⌊train_fraction·T⌋ − 1``. The group size must be ``branches · len(branch_steps)``
            (checked before any model loads).
        branches (`int`, defaults to 6):
            Samples per branch step (the reference's ``exploration_k``), ≥ 2: the group they form has
            an advantage only if its rewards can differ.
        train_fraction (`float`, defaults to 0.99):
            With ``branch_steps = None``, the share of the grid's steps that branch (the reference's
            ``timestep_fraction``).
    """

    branch_steps: tuple[int, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(as_int_tuple),
        validator=attrs.validators.optional(increasing_integers(0, empty=False)))
    branches: int = attrs.field(default=6, converter=as_integer, validator=integer(2))
    train_fraction: float = attrs.field(default=0.99, converter=float)

    def __attrs_post_init__(self) -> None:
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")

    def steps(self, num_steps: int) -> tuple[int, ...]:
        """The branch steps on a grid of ``num_steps`` steps, checked to lie in it."""
        if self.branch_steps is None:
            count = max(1, min(math.floor(self.train_fraction * num_steps + 1e-9), num_steps))
            return tuple(range(count))
        outside = [i for i in self.branch_steps if i >= num_steps]
        if outside:
            raise ValueError(f"BranchPoints.branch_steps = {self.branch_steps} branches at steps {outside}, outside "
                             f"the grid of TrainConfig.num_steps = {num_steps} steps (0..{num_steps - 1})")
        return self.branch_steps

    def group_size(self, num_steps: int) -> int:
        """The samples a group must hold: ``branches`` per branch step."""
        return self.branches * len(self.steps(num_steps))

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        for name, value, minimum in (("iteration", iteration, 0), ("num_steps", num_steps, 1),
                                     ("num_samples", num_samples, 1)):
            if isinstance(value, bool) or int(value) != value or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        steps = self.steps(num_steps)
        size = self.branches * len(steps)
        # sample n is row n mod size of its group: child of branch step steps[(n mod size) // branches]
        train = tuple((steps[(n % size) // self.branches],) for n in range(num_samples))
        return StepPlan(num_steps=num_steps, sde_steps=steps, train_steps=train, per_sample=True,
                        trunk_branches=self.branches)


@hookimpl
def register_schedules(register):
    register("branch_points", BranchPoints)
