"""``ScheduleContract``: the tests every ``WindowSchedule`` plugin must pass.

Subclass it in a test module, name the subclass ``Test…`` and override ``make_schedule``::

    class TestMySchedule(ScheduleContract):
        def make_schedule(self):
            return MySchedule(window_size=3)

Checked for several grid sizes T and iterations (docs/algorithms.md §4, §5):

- ``plan`` returns a ``StepPlan`` for ``num_steps`` steps with sorted, unique indices in 0..T−1
  and trained steps ⊆ SDE steps;
- purity: the same inputs give equal plans whatever was computed before (plan(5) then plan(3)
  equals plan(3) on a fresh instance), and a new instance with the same arguments (another
  process, or a resumed run) computes the same plans;
- per-sample plans have one row per sample, and sample n's row does not depend on how many
  samples were planned (batch layout independence);
- the last step T−1 (into σ = 0) is not trained, except by a full window that reached the end of
  the grid (the paper clamps the window start at T − w);
- a windowed plan's ``window = (start, size)`` lies in the grid and holds every SDE step;
- randomness comes only from the run seed passed to ``plan(..., seed=...)``.

Override ``grid_sizes``, ``iterations`` or ``num_samples`` to adapt the problem (e.g. T ≥ w).
"""

from __future__ import annotations

from mixgrpo.core.interfaces import WindowSchedule
from mixgrpo.core.types import StepPlan


class ScheduleContract:
    """Generic tests for a ``WindowSchedule``. Subclasses override ``make_schedule``."""

    #: grid sizes T to plan on (each must fit the schedule's window)
    grid_sizes: tuple[int, ...] = (8, 10, 25)
    #: iterations to plan (order matters for the purity check: not monotone on purpose)
    iterations: tuple[int, ...] = (0, 1, 3, 24, 25, 26, 99, 300, 7, 1000)
    #: samples per plan (matters only to per-sample schedules)
    num_samples: int = 5
    #: the run seed passed to ``plan`` (a schedule's randomness comes from it, never from its constructor)
    seed: int = 5

    def make_schedule(self) -> WindowSchedule:
        """Return the schedule under test (override in the subclass)."""
        raise NotImplementedError(f"{type(self).__name__} must override make_schedule()")

    def _plans(self, schedule: WindowSchedule, num_steps: int) -> list[StepPlan]:
        return [schedule.plan(k, num_steps, self.num_samples, seed=self.seed) for k in self.iterations]

    # -- shape of a plan -----------------------------------------------------------------------
    def test_plan_is_a_step_plan_for_the_grid(self):
        schedule = self.make_schedule()
        for num_steps in self.grid_sizes:
            for plan in self._plans(schedule, num_steps):
                assert isinstance(plan, StepPlan)
                assert plan.num_steps == num_steps

    def test_indices_sorted_unique_and_in_range(self):
        schedule = self.make_schedule()
        for num_steps in self.grid_sizes:
            for plan in self._plans(schedule, num_steps):
                rows = [plan.sde_steps] + [plan.train_steps_for(n) for n in range(self.num_samples)]
                for row in rows:
                    assert list(row) == sorted(set(row)), row
                    assert all(isinstance(i, int) and 0 <= i < num_steps for i in row), row

    def test_train_steps_are_sde_steps(self):
        schedule = self.make_schedule()
        for num_steps in self.grid_sizes:
            for plan in self._plans(schedule, num_steps):
                for n in range(self.num_samples):
                    assert set(plan.train_steps_for(n)) <= set(plan.sde_steps)

    def test_last_step_trained_only_by_a_window_at_the_end(self):
        schedule = self.make_schedule()
        for num_steps in self.grid_sizes:
            for plan in self._plans(schedule, num_steps):
                if num_steps - 1 in plan.all_train_steps():
                    assert plan.window is not None, f"step T-1 = {num_steps - 1} trained without a window"
                    start, size = plan.window
                    assert start + size == num_steps

    def test_window_lies_in_the_grid_and_holds_the_sde_steps(self):
        schedule = self.make_schedule()
        for num_steps in self.grid_sizes:
            for plan in self._plans(schedule, num_steps):
                if plan.window is None:
                    continue
                start, size = plan.window
                assert size >= 1 and 0 <= start and start + size <= num_steps
                assert set(plan.sde_steps) <= set(range(start, start + size))

    def test_per_sample_rows(self):
        schedule = self.make_schedule()
        for num_steps in self.grid_sizes:
            plan = schedule.plan(2, num_steps, self.num_samples, seed=self.seed)
            if not plan.per_sample:
                continue
            assert len(plan.train_steps) == self.num_samples
            bigger = schedule.plan(2, num_steps, self.num_samples + 3, seed=self.seed)
            assert bigger.train_steps[: self.num_samples] == plan.train_steps

    # -- purity --------------------------------------------------------------------------------
    def test_plan_is_pure(self):
        for num_steps in self.grid_sizes:
            schedule = self.make_schedule()
            forward = self._plans(schedule, num_steps)
            backward = [schedule.plan(k, num_steps, self.num_samples, seed=self.seed)
                        for k in reversed(self.iterations)]
            assert forward == backward[::-1]
            schedule.plan(5, num_steps, self.num_samples, seed=self.seed)
            after = schedule.plan(3, num_steps, self.num_samples, seed=self.seed)
            assert after == self.make_schedule().plan(3, num_steps, self.num_samples, seed=self.seed)

    def test_plans_depend_on_the_run_seed_alone(self):
        # the seed is the run's: plans for another seed are valid plans, and drawing them does
        # not change the plans of this seed (no state carried from one call to the next)
        for num_steps in self.grid_sizes:
            schedule = self.make_schedule()
            mine = self._plans(schedule, num_steps)
            for plan in (schedule.plan(k, num_steps, self.num_samples, seed=self.seed + 1) for k in self.iterations):
                assert plan.num_steps == num_steps and set(plan.all_train_steps()) <= set(plan.sde_steps)
            assert self._plans(schedule, num_steps) == mine

    def test_same_arguments_give_the_same_plans(self):
        # two instances stand for two processes (or a run and its resumption)
        for num_steps in self.grid_sizes:
            assert self._plans(self.make_schedule(), num_steps) == self._plans(self.make_schedule(), num_steps)
