"""BranchGRPO's plan: where each group's tree splits, which steps are SDE, which are trained
(docs/algorithms.md, "Tree rollouts (BranchGRPO)").

The reference (Fredreic1849/BranchGRPO, ``fastvideo/train_branchgrpo_flux.py`` and
``scripts/finetune/finetune_flux_branchgrpo_8gpus.sh``) splits every node in two
(``num_splits = 2``) at ``--tree_split_points "0,3,6,9"`` of T = 20 steps, so a group is a tree of
2^4 = 16 leaves; every step is an SDE step and every edge of the tree is trained. Its mixed variant
(``--mix_ode_sde_tree``) takes SDE steps inside a window of ``--mix_sde_window_size`` = 4 steps
from step 0 and at every split, ODE elsewhere, and trains the SDE edges only. Depth pruning
(``--depth_pruning``) leaves the edges into the given depths (a child after step i has depth i + 1)
out of training; with ``--depth_pruning_slide`` the pruned depths move up by one every
``--depth_pruning_slide_interval`` training steps, until the shallowest reaches
``--depth_pruning_stop_depth`` (by default the last split step).
"""

from __future__ import annotations

from typing import Any

import attrs

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import WindowSchedule
from mixgrpo.core.types import StepPlan
from mixgrpo.core.validators import as_int_tuple, as_integer, increasing_integers, integer, optional_int


def _at_least_or_none(minimum: int) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
        if value is not None and value < minimum:
            raise ValueError(f"{attribute.name} must be an integer >= {minimum}, or None, got {value}")
    return check


@attrs.frozen
class Branching(WindowSchedule):
    """A tree per group: splits at ``branch_steps`` into ``branch_factor`` children each.

    Args:
        branch_steps (`tuple[int, ...]`, defaults to (0, 3, 6, 9)):
            The steps at which every node splits (the reference script's ``--tree_split_points``);
            the group size must be ``branch_factor ** len(branch_steps)`` (checked before any model
            loads).
        branch_factor (`int`, defaults to 2):
            Children per split (the reference's fixed ``num_splits = 2``).
        mix_window (`int`, defaults to None):
            None: every step is an SDE step (BranchGRPO). w: SDE on steps 0..w−1 and on the branch
            steps, ODE elsewhere (BranchGRPO-Mix, ``--mix_sde_window_size``).
        prune_depths (`tuple[int, ...]`, defaults to ()):
            Depths whose incoming edges are not trained (depth of the child after step i: i + 1).
        prune_slide_every (`int`, defaults to None):
            Move the pruned depths up by one every this many iterations (None: they stay).
        prune_stop_depth (`int`, defaults to None):
            The shallowest depth the sliding may reach (None: the last branch step).
        prune_until (`int`, defaults to None):
            The last iteration (1-based) that prunes; later ones train every depth (None: all prune). The
            reference's ``--pruning_step_ratio r`` of a run of n iterations is ``int(r·n)``; bind
            ``BranchGRPO.prune_until`` to the same for its width pruning.
    """

    branch_steps: tuple[int, ...] = attrs.field(default=(0, 3, 6, 9), converter=as_int_tuple,
                                                 validator=increasing_integers(0, empty=False))
    branch_factor: int = attrs.field(default=2, converter=as_integer, validator=integer(2))
    mix_window: int | None = attrs.field(default=None, converter=optional_int, validator=_at_least_or_none(1))
    prune_depths: tuple[int, ...] = attrs.field(default=(), converter=as_int_tuple,
                                                validator=increasing_integers(1, True))
    prune_slide_every: int | None = attrs.field(default=None, converter=optional_int,
                                                validator=_at_least_or_none(1))
    prune_stop_depth: int | None = attrs.field(default=None, converter=optional_int, validator=_at_least_or_none(0))
    prune_until: int | None = attrs.field(default=None, converter=optional_int, validator=_at_least_or_none(0))

    def leaves(self) -> int:
        """Leaves of one tree: the group size it needs."""
        return self.branch_factor ** len(self.branch_steps)

    def sde_steps(self, num_steps: int) -> tuple[int, ...]:
        if self.mix_window is None:
            return tuple(range(num_steps))
        return tuple(sorted(set(range(min(self.mix_window, num_steps))) | set(self.branch_steps)))

    def pruned_depths(self, iteration: int) -> tuple[int, ...]:
        """The depths left out of training at ``iteration`` (0-based; the reference counts training
        steps from 1, so its step k + 1 is our iteration k)."""
        if self.prune_until is not None and iteration + 1 > self.prune_until:
            return ()
        if not self.prune_depths or self.prune_slide_every is None:
            return self.prune_depths
        stop = self.branch_steps[-1] if self.prune_stop_depth is None else self.prune_stop_depth
        shift = min((iteration + 1) // self.prune_slide_every, max(0, self.prune_depths[0] - stop))
        return tuple(d - shift for d in self.prune_depths)

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        self._check_grid(num_steps)
        sde = self.sde_steps(num_steps)
        pruned = {d - 1 for d in self.pruned_depths(iteration)}
        return StepPlan(num_steps=num_steps, sde_steps=sde, train_steps=tuple(i for i in sde if i not in pruned),
                        branch_steps=self.branch_steps, branch_factor=self.branch_factor)

    def _check_grid(self, num_steps: int) -> None:
        outside = [i for i in self.branch_steps if i >= num_steps]
        if outside:
            raise ValueError(
                f"Branching.branch_steps = {self.branch_steps} splits at steps {outside}, outside the grid of "
                f"TrainConfig.num_steps = {num_steps} steps (0..{num_steps - 1}): bind Branching.branch_steps to "
                f"steps below {num_steps}, or raise TrainConfig.num_steps")
        if self.mix_window is not None and self.mix_window > num_steps:
            raise ValueError(f"Branching.mix_window = {self.mix_window} exceeds TrainConfig.num_steps = {num_steps}: "
                             f"use a window of at most {num_steps} steps")


@hookimpl
def register_schedules(register):
    register("branching", Branching)
