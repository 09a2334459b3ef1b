"""Window schedules: which steps of a rollout are SDE steps and which are trained (docs/algorithms.md §4, §5).

Every schedule's ``plan(iteration, num_steps, num_samples, seed)`` is a pure function of
``(iteration, seed)`` (the run's seed) and its constructor arguments: no state is kept between
calls, so resuming a run needs nothing saved, the calling order is irrelevant, and every process computes the same plan
(random draws come from a generator keyed by ``(seed, iteration, …)``, never from global RNG state).
Schedules are frozen ``attrs`` classes: their arguments are checked by validators when one is
built (``mixgrpo.core.validators``), and a built schedule cannot change.

| name | class | SDE steps | trained steps |
|---|---|---|---|
| ``all`` | ``AllSteps`` | all | the first ⌊0.99·T⌋, at most T−1 (FlowGRPO) |
| ``random_subset`` | ``RandomSubset`` | all | per sample, a random ⌊0.6·(T−1)⌋ of 0..T−2 (DanceGRPO) |
| ``fixed`` | ``FixedWindow`` | a constant window | the window (frozen; Flash*) |
| ``progressive`` | ``ProgressiveWindow`` | the window W(l) | the window (MixGRPO Alg. 1) |
| ``random`` | ``RandomWindow`` | a window at l ~ U{0..T−w} | the window |
| ``decay`` | ``DecayWindow`` | progressive, dwell τ(l) shrinking with l | the window |

Windowed schedules follow the paper: windows are always full (w steps) and the start is clamped
at T − w, so a window that reached the end contains the last step T − 1 (the reference code
instead shrinks windows near the end and can never train its last two steps; not copied).
"""

from __future__ import annotations

import math

import attrs
import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import WindowSchedule
from mixgrpo.core.rollout import keyed_generator
from mixgrpo.core.types import StepPlan
from mixgrpo.core.validators import as_integer, in_unit_interval, integer, non_negative, not_above, one_of

DECAY_MODES = ("linear", "exp")


# -- validation helpers ----------------------------------------------------------------------------
def _int_field(default: int, minimum: int) -> int:
    """An attrs field holding an integer >= ``minimum`` (a whole float such as 4.0 is taken as 4)."""
    return attrs.field(default=default, converter=as_integer, validator=integer(minimum))


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_call(iteration: int, num_steps: int, num_samples: int) -> None:
    _check_int("iteration", iteration, 0)
    _check_int("num_steps", num_steps, 1)
    _check_int("num_samples", num_samples, 1)


def _check_fits(window_size: int, num_steps: int, start: int = 0) -> None:
    """A window of ``window_size`` steps starting at ``start`` must lie inside 0..T−1."""
    if window_size > num_steps:
        raise ValueError(
            f"window_size={window_size} exceeds num_steps={num_steps}: a window must fit in the grid "
            f"(use window_size <= {num_steps})"
        )
    if start + window_size > num_steps:
        raise ValueError(
            f"a window of {window_size} steps starting at {start} does not fit in a grid of {num_steps} "
            f"steps (start must be <= num_steps - window_size = {num_steps - window_size})"
        )


def _window_plan(num_steps: int, start: int, size: int) -> StepPlan:
    """The plan of a windowed schedule: SDE steps = trained steps = {start, …, start+size−1}."""
    steps = tuple(range(start, start + size))
    return StepPlan(num_steps=num_steps, sde_steps=steps, train_steps=steps, window=(start, size))


def _positions(start: int, stride: int, last: int, count: int) -> int:
    """The start after ``count`` advances of ``stride`` from ``start``, clamped at ``last``."""
    return min(start + count * stride, last)


# -- forward-process objectives ----------------------------------------------------------------------
@attrs.frozen
class ODEOnly(WindowSchedule):
    """No SDE step and no trained transition: every step is walked by the ODE solvers (the
    ``post_solver`` role, since there is no window). The rollout of forward-process objectives
    (DiffusionNFT, AWM), which train on the final samples alone; a GRPO objective refuses it."""

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        _check_call(iteration, num_steps, num_samples)
        return StepPlan(num_steps=num_steps, sde_steps=(), train_steps=())


# -- FlowGRPO and DanceGRPO --------------------------------------------------------------------------
@attrs.frozen
class AllSteps(WindowSchedule):
    """FlowGRPO: every step is an SDE step; the first ⌊train_fraction·T⌋ steps are trained.

    With the default fraction this is all steps but the last; the last step into σ = 0 is never
    trained whatever the fraction (at most T − 1 trained steps). No window (``plan.window`` is None).

    Args:
        train_fraction (`float`, defaults to 0.99):
            Fraction of the T steps trained, in order from the first (FlowGRPO's
            ``timestep_fraction``); in [0, 1].
    """

    train_fraction: float = attrs.field(default=0.99, converter=float, validator=in_unit_interval)

    def num_trained(self, num_steps: int) -> int:
        # the 1e-9 keeps e.g. 0.29·100 = 28.999999999999996 at 29
        return min(math.floor(self.train_fraction * num_steps + 1e-9), num_steps - 1)

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        _check_call(iteration, num_steps, num_samples)
        return StepPlan(
            num_steps=num_steps,
            sde_steps=tuple(range(num_steps)),
            train_steps=tuple(range(self.num_trained(num_steps))),
        )


@attrs.frozen
class RandomSubset(WindowSchedule):
    """DanceGRPO: every step is an SDE step; each sample trains its own random subset of steps.

    The subset of global sample n at iteration k is the sorted first ⌊fraction·(T−1)⌋ entries of a
    random permutation of 0..T−2 drawn from a generator keyed by the run's ``(seed, k, n)`` alone, so
    it does not depend on how samples are batched or spread over processes. The last step is never trained.

    Args:
        fraction (`float`, defaults to 0.6):
            Fraction of the T − 1 trainable steps each sample trains (DanceGRPO's
            ``timestep_fraction``); in [0, 1].
    """

    fraction: float = attrs.field(default=0.6, converter=float, validator=in_unit_interval)

    def num_trained(self, num_steps: int) -> int:
        return math.floor(self.fraction * (num_steps - 1) + 1e-9)

    def steps_for(self, iteration: int, num_steps: int, sample: int, seed: int = 0) -> tuple[int, ...]:
        """The sorted trained steps of global sample ``sample`` at ``iteration`` of the run ``seed``."""
        gen = keyed_generator(seed, "random_subset", iteration, sample)
        perm = torch.randperm(num_steps - 1, generator=gen) if num_steps > 1 else torch.zeros(0, dtype=torch.long)
        return tuple(sorted(perm[: self.num_trained(num_steps)].tolist()))

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        _check_call(iteration, num_steps, num_samples)
        rows = tuple(self.steps_for(iteration, num_steps, n, seed) for n in range(num_samples))
        return StepPlan(num_steps=num_steps, sde_steps=tuple(range(num_steps)), train_steps=rows, per_sample=True)


# -- MixGRPO windows ---------------------------------------------------------------------------------
@attrs.frozen
class FixedWindow(WindowSchedule):
    """A frozen window: the same w steps are SDE and trained at every iteration (MixGRPO "frozen",
    and MixGRPO-Flash* with ``start=0``).

    Args:
        start (`int`, defaults to 0):
            First step of the window.
        window_size (`int`, defaults to 4):
            Number of steps w in the window; ``start + w <= T`` is checked when planning.
    """

    start: int = _int_field(0, minimum=0)
    window_size: int = _int_field(4, minimum=1)

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        _check_call(iteration, num_steps, num_samples)
        _check_fits(self.window_size, num_steps, self.start)
        return _window_plan(num_steps, self.start, self.window_size)


@attrs.frozen
class ProgressiveWindow(WindowSchedule):
    """MixGRPO's sliding window (paper Alg. 1): l = start; every τ iterations l ← min(l + s, T − w).

    In closed form the start at iteration k is ``min(start + ⌊k/τ⌋·s, T − w)``. With the paper
    defaults (w = 4, τ = 25, s = 1, T = 25, 300 iterations) l visits 0..11, 25 iterations each.
    Windows are always full.

    Args:
        window_size (`int`, defaults to 4):
            Number of steps w in the window (paper ablation: 2 / 4 / 6); must be <= T.
        shift_interval (`int`, defaults to 25):
            Iterations τ between two moves of the window (MixGRPO-Flash: 20).
        stride (`int`, defaults to 1):
            Steps s the window moves each time; 0 freezes it.
        start (`int`, defaults to 0):
            Initial window start; must be <= T − w.
        rollback (`bool`, defaults to False):
            False (the paper): the window stops at T − w. True: a move past T − w goes back to
            ``start`` and the window sweeps again (a roll-back option in the spirit of the
            reference code, which rolls back to 0).
    """

    window_size: int = _int_field(4, minimum=1)
    shift_interval: int = _int_field(25, minimum=1)
    stride: int = _int_field(1, minimum=0)
    start: int = _int_field(0, minimum=0)
    rollback: bool = attrs.field(default=False, converter=bool)

    def window_start(self, iteration: int, num_steps: int) -> int:
        """The window start l at ``iteration`` on a grid of ``num_steps`` steps."""
        _check_fits(self.window_size, num_steps, self.start)
        last = num_steps - self.window_size
        moves = iteration // self.shift_interval
        if self.stride == 0:
            return self.start
        if self.rollback:
            # the starts start, start+s, … that are <= T−w, visited cyclically
            count = (last - self.start) // self.stride + 1
            return self.start + (moves % count) * self.stride
        return _positions(self.start, self.stride, last, moves)

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        _check_call(iteration, num_steps, num_samples)
        return _window_plan(num_steps, self.window_start(iteration, num_steps), self.window_size)


@attrs.frozen
class RandomWindow(WindowSchedule):
    """A window at a uniformly random start l ~ U{0..T−w}, drawn afresh each iteration (MixGRPO's
    "random" ablation; Flow-GRPO-Fast's random window).

    The draw comes from a generator keyed by the run's ``(seed, iteration)``, so every process draws
    the same window, resuming reproduces it, and runs with different seeds draw different windows.

    Args:
        window_size (`int`, defaults to 4):
            Number of steps w in the window; must be <= T.
    """

    window_size: int = _int_field(4, minimum=1)

    def window_start(self, iteration: int, num_steps: int, seed: int = 0) -> int:
        _check_fits(self.window_size, num_steps)
        gen = keyed_generator(seed, "random_window", iteration)
        return int(torch.randint(num_steps - self.window_size + 1, (1,), generator=gen))

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        _check_call(iteration, num_steps, num_samples)
        return _window_plan(num_steps, self.window_start(iteration, num_steps, seed), self.window_size)


@attrs.frozen
class DecayWindow(WindowSchedule):
    """Progressive window whose dwell time τ(l) shrinks as the window moves (MixGRPO ablation).

    The window stays τ(l) iterations at start l, then moves by ``stride`` (clamped at T − w, where
    it stays). Dwell times:

    - ``mode="linear"``: τ(l) = ⌈τ_max − (τ_max − τ_min)·l/(T − w)⌉, from τ_max at l = 0 down to
      τ_min at l = T − w (the ceiling keeps both ends exact integers);
    - ``mode="exp"``: τ(l) = ⌈τ·exp(−k·ReLU(l − l0))⌉: constant τ up to l0, then decaying.

    Args:
        window_size (`int`, defaults to 4):
            Number of steps w in the window; must be <= T.
        mode (`str`, defaults to `"linear"`):
            ``"linear"`` or ``"exp"``.
        tau_max (`int`, defaults to 25), tau_min (`int`, defaults to 10):
            Linear mode: dwell at l = 0 and at l = T − w.
        tau (`int`, defaults to 25), k (`float`, defaults to 0.1), l0 (`int`, defaults to 13):
            Exp mode: base dwell, decay rate and the start from which it decays.
        stride (`int`, defaults to 1), start (`int`, defaults to 0):
            Move size and initial start, as in ``ProgressiveWindow``.
    """

    window_size: int = _int_field(4, minimum=1)
    mode: str = attrs.field(default="linear", validator=one_of("decay mode", DECAY_MODES))
    tau_max: int = _int_field(25, minimum=1)
    tau_min: int = attrs.field(default=10, converter=as_integer, validator=[integer(1), not_above("tau_max")])
    tau: int = _int_field(25, minimum=1)
    k: float = attrs.field(default=0.1, converter=float, validator=non_negative)
    l0: int = attrs.field(default=13, converter=int)
    stride: int = _int_field(1, minimum=1)
    start: int = _int_field(0, minimum=0)

    def dwell(self, start: int, num_steps: int) -> int:
        """τ(l): the iterations the window stays at start ``start`` (>= 1)."""
        last = num_steps - self.window_size
        if self.mode == "linear":
            fraction = start / last if last > 0 else 0.0
            value = self.tau_max - (self.tau_max - self.tau_min) * fraction
        else:
            value = self.tau * math.exp(-self.k * max(start - self.l0, 0))
        # round away float noise first (25.000000000000004 must not become 26)
        return max(math.ceil(round(value, 9)), 1)

    def window_start(self, iteration: int, num_steps: int) -> int:
        _check_fits(self.window_size, num_steps, self.start)
        last = num_steps - self.window_size
        # at most T − w + 1 distinct starts: a short walk, recomputed each call (pure)
        begin, start = 0, self.start
        while start < last:
            end = begin + self.dwell(start, num_steps)
            if iteration < end:
                return start
            begin, start = end, min(start + self.stride, last)
        return last

    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        _check_call(iteration, num_steps, num_samples)
        return _window_plan(num_steps, self.window_start(iteration, num_steps), self.window_size)


@hookimpl
def register_schedules(register):
    register("all", AllSteps)
    register("random_subset", RandomSubset)
    register("fixed", FixedWindow)
    register("progressive", ProgressiveWindow)
    register("random", RandomWindow)
    register("decay", DecayWindow)
    register("ode", ODEOnly)
