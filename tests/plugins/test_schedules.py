"""Window schedules (docs/algorithms.md §4, §5): the paper's sequences, reference loops, purity, errors."""

import math
from collections import Counter

import attrs
import pytest

from mixgrpo.core.config import parse_gin
from mixgrpo.core.plugins import PluginManager
from mixgrpo.plugins.schedules.windows import (
    AllSteps,
    DecayWindow,
    FixedWindow,
    ProgressiveWindow,
    RandomSubset,
    RandomWindow,
)
from mixgrpo.testing.schedules import ScheduleContract


def starts(schedule, iterations, num_steps=25):
    return [schedule.plan(k, num_steps).window[0] for k in range(iterations)]


def alg1_reference(iterations, num_steps, w, tau, stride, start=0, rollback=False):
    """Paper Alg. 1 as a stateful loop: l = start; every τ iterations l ← min(l + s, T − w)."""
    out, pos = [], start
    for k in range(iterations):
        if k > 0 and k % tau == 0:
            pos += stride
            if rollback and pos > num_steps - w:
                pos = start
            pos = min(pos, num_steps - w)
        out.append(pos)
    return out


# -- progressive -----------------------------------------------------------------------------------
def test_progressive_paper_defaults_visit_0_to_11_for_25_iterations_each():
    sched = ProgressiveWindow()  # w = 4, τ = 25, s = 1
    seq = starts(sched, 300)
    assert seq == [k // 25 for k in range(300)]
    assert Counter(seq) == {pos: 25 for pos in range(12)}
    plan = sched.plan(299, 25)
    assert plan.window == (11, 4)
    assert plan.sde_steps == plan.train_steps == (11, 12, 13, 14)


def test_progressive_matches_the_alg1_loop():
    for (w, tau, s, T) in [(4, 25, 1, 25), (3, 7, 2, 12), (2, 1, 3, 10), (6, 20, 1, 25)]:
        sched = ProgressiveWindow(window_size=w, shift_interval=tau, stride=s)
        assert starts(sched, 700, T) == alg1_reference(700, T, w, tau, s), (w, tau, s, T)


def test_progressive_clamps_at_T_minus_w_with_full_windows():
    sched = ProgressiveWindow()
    assert sched.plan(21 * 25, 25).window == (21, 4)
    for k in (21 * 25, 22 * 25, 5000, 10**6):
        plan = sched.plan(k, 25)
        assert plan.window == (21, 4)
        assert plan.train_steps == (21, 22, 23, 24)  # full: the paper clamps, never shrinks
    assert sched.plan(21 * 25 - 1, 25).window == (20, 4)


def test_progressive_stride_two():
    sched = ProgressiveWindow(window_size=4, shift_interval=10, stride=2)
    seq = starts(sched, 200, 25)
    # 0, 2, …, 20 then the clamp at T − w = 21 (not 22)
    assert seq == [min(2 * (k // 10), 21) for k in range(200)]
    assert seq[100:] == [20] * 10 + [21] * 90


def test_progressive_rollback_sweeps_again_from_start():
    sched = ProgressiveWindow(window_size=4, shift_interval=2, stride=3, start=1, rollback=True)
    T = 12  # starts 1, 4, 7 (≤ T − w = 8), then back to 1
    seq = starts(sched, 20, T)
    assert seq == [[1, 4, 7][(k // 2) % 3] for k in range(20)]
    assert seq == alg1_reference(20, T, 4, 2, 3, start=1, rollback=True)
    exact = ProgressiveWindow(window_size=4, shift_interval=1, stride=1, rollback=True)
    assert starts(exact, 8, 7) == [0, 1, 2, 3, 0, 1, 2, 3]  # T − w = 3 is visited when aligned


def test_progressive_start_and_stride_zero_is_frozen():
    sched = ProgressiveWindow(window_size=3, stride=0, start=5)
    assert set(starts(sched, 100, 10)) == {5}


def test_fixed_window_is_frozen():
    sched = FixedWindow(start=2, window_size=4)
    for k in (0, 1, 50, 10**5):
        plan = sched.plan(k, 25)
        assert plan.window == (2, 4)
        assert plan.sde_steps == plan.train_steps == (2, 3, 4, 5)
    assert FixedWindow().plan(123, 25).window == (0, 4)  # Flash*: l = 0, w = 4


@pytest.mark.parametrize("make", [
    lambda: ProgressiveWindow(window_size=6),
    lambda: RandomWindow(window_size=6),
    lambda: DecayWindow(window_size=6),
    lambda: FixedWindow(window_size=6),
])
def test_window_larger_than_grid_raises(make):
    with pytest.raises(ValueError, match=r"window_size=6 exceeds num_steps=5"):
        make().plan(0, 5)


def test_window_that_does_not_fit_from_its_start_raises():
    with pytest.raises(ValueError, match="does not fit"):
        FixedWindow(start=3, window_size=4).plan(0, 6)
    with pytest.raises(ValueError, match="does not fit"):
        ProgressiveWindow(window_size=4, start=3).plan(0, 6)


@pytest.mark.parametrize("kwargs", [dict(window_size=0), dict(shift_interval=0), dict(stride=-1), dict(start=-1)])
def test_progressive_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ProgressiveWindow(**kwargs)


def test_negative_iteration_raises():
    with pytest.raises(ValueError, match="iteration"):
        ProgressiveWindow().plan(-1, 25)


# -- random window ---------------------------------------------------------------------------------
def test_random_window_is_the_same_on_two_processes_and_differs_by_run_seed():
    a, b = RandomWindow(), RandomWindow()
    seq_a = [a.plan(k, 25, seed=3).window for k in range(200)]
    seq_b = [b.plan(k, 25, seed=3).window for k in reversed(range(200))][::-1]
    assert seq_a == seq_b
    assert seq_a != [RandomWindow().plan(k, 25, seed=4).window for k in range(200)]


def test_random_window_covers_the_range_uniformly():
    sched = RandomWindow(window_size=4)
    n, positions = 4400, 22  # l ∈ {0..21}
    counts = Counter(sched.plan(k, 25).window[0] for k in range(n))
    assert set(counts) == set(range(positions))
    expected = n / positions
    chi2 = sum((counts[pos] - expected) ** 2 / expected for pos in range(positions))
    assert chi2 < 46.8  # the 0.999 quantile of χ² with 21 degrees of freedom
    assert all(sched.plan(k, 25).window[1] == 4 for k in range(50))


# -- FlowGRPO / DanceGRPO ----------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 10, 25, 100])
def test_all_steps_trains_all_but_the_last(T):
    plan = AllSteps().plan(7, T, 3)
    assert plan.sde_steps == tuple(range(T))
    assert plan.train_steps == tuple(range(T - 1))  # ⌊0.99·T⌋ clamped to T − 1
    assert plan.window is None and not plan.per_sample


def test_all_steps_fraction_and_clamp():
    assert AllSteps(train_fraction=0.5).plan(0, 10).train_steps == (0, 1, 2, 3, 4)
    assert AllSteps(train_fraction=1.0).plan(0, 10).train_steps == tuple(range(9))  # never T − 1
    assert AllSteps(train_fraction=0.29).plan(0, 100).num_train_steps == 29  # no float floor slip


def test_random_subset_size_range_and_last_step():
    T, N = 25, 40
    plan = RandomSubset().plan(4, T, N)
    assert plan.per_sample and plan.sde_steps == tuple(range(T))
    size = math.floor(0.6 * (T - 1))
    assert size == 14  # DanceGRPO with T = 25: 14 trained steps (MixGRPO Table 1)
    for row in plan.train_steps:
        assert len(row) == size and list(row) == sorted(set(row))
        assert all(0 <= i <= T - 2 for i in row)
    assert len(set(plan.train_steps)) > N // 2  # fresh per sample


def test_random_subset_rows_do_not_depend_on_batch_layout():
    """Global sample n gets the same steps whether planned alone, in a batch of 8 or of 24 (two
    processes each selecting their rows of the global plan, as the trainer does)."""
    T = 16
    whole = RandomSubset().plan(3, T, 24, seed=11).train_steps
    other_process = RandomSubset()
    assert other_process.plan(3, T, 8, seed=11).train_steps == whole[:8]
    assert all(other_process.steps_for(3, T, n, seed=11) == whole[n] for n in range(24))
    assert RandomSubset().plan(4, T, 24, seed=11).train_steps != whole  # fresh each iteration
    assert RandomSubset().plan(3, T, 24, seed=12).train_steps != whole  # and for each run seed


def test_random_subset_is_roughly_uniform_over_steps():
    T, N = 11, 600
    plan = RandomSubset(fraction=0.5).plan(0, T, N)
    counts = Counter(i for row in plan.train_steps for i in row)
    assert set(counts) == set(range(T - 1))
    expected = N * 5 / 10
    assert all(abs(counts[i] - expected) < 0.15 * expected for i in range(T - 1))


# -- decay -----------------------------------------------------------------------------------------
def decay_reference(iterations, num_steps, w, dwell):
    """Stateful loop: stay dwell(l) iterations at l, then l ← min(l + 1, T − w)."""
    out, pos, stay = [], 0, 0
    for _ in range(iterations):
        if pos < num_steps - w and stay == dwell(pos):
            pos, stay = pos + 1, 0
        out.append(pos)
        stay += 1
    return out


def test_decay_linear_matches_the_reference_loop():
    T, w = 25, 4
    sched = DecayWindow(mode="linear", tau_max=25, tau_min=10)
    # hand values: τ(0) = 25, τ(1) = ⌈25 − 15/21⌉ = 25, τ(7) = ⌈20⌉ = 20, τ(14) = ⌈15⌉ = 15, τ(21) = 10
    assert [sched.dwell(pos, T) for pos in (0, 1, 7, 14, 20, 21)] == [25, 25, 20, 15, 11, 10]
    expected = decay_reference(600, T, w, lambda pos: math.ceil(25 - 15 * pos / 21 - 1e-9))
    assert starts(sched, 600, T) == expected
    assert expected[-1] == 21 and expected.index(1) == 25


def test_decay_exp_matches_the_reference_loop():
    T, w = 25, 4
    sched = DecayWindow(mode="exp")  # τ = 25, k = 0.1, l0 = 13
    hand = {13: 25, 14: math.ceil(25 * math.exp(-0.1)), 20: math.ceil(25 * math.exp(-0.7))}
    assert hand == {13: 25, 14: 23, 20: 13}
    assert {pos: sched.dwell(pos, T) for pos in hand} == hand
    expected = decay_reference(700, T, w, lambda pos: math.ceil(25 * math.exp(-0.1 * max(pos - 13, 0))))
    assert starts(sched, 700, T) == expected
    # up to l0 = 13 the dwell is the constant τ = 25, exactly like the progressive window
    assert expected[: 14 * 25] == [k // 25 for k in range(14 * 25)]


def test_decay_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown decay mode"):
        DecayWindow(mode="cosine")


@pytest.mark.parametrize("make, message", [
    (lambda: ProgressiveWindow(window_size=0), "window_size must be an integer >= 1, got 0"),
    (lambda: ProgressiveWindow(stride=-1), "stride must be an integer >= 0, got -1"),
    (lambda: ProgressiveWindow(shift_interval=2.5), "shift_interval must be an integer >= 1, got 2.5"),
    (lambda: FixedWindow(start=True), "start must be an integer >= 0, got True"),
    (lambda: DecayWindow(stride=0), "stride must be an integer >= 1, got 0"),
    (lambda: DecayWindow(tau_min=30), "tau_min=30 must be <= tau_max=25"),
    (lambda: DecayWindow(k=-0.5), "k must be >= 0, got -0.5"),
    (lambda: DecayWindow(mode="cosine"), "unknown decay mode 'cosine'; valid: linear, exp"),
    (lambda: AllSteps(train_fraction=1.5), "train_fraction must be in [0, 1], got 1.5"),
    (lambda: RandomSubset(fraction=float("nan")), "fraction must be in [0, 1], got nan"),
])
def test_arguments_are_checked_with_messages_that_name_them(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value) == message


def test_schedules_are_frozen_records():
    sched = ProgressiveWindow(window_size=3.0, shift_interval=10)
    # a whole float is taken as an int, and the repr and equality are attrs' own
    assert sched.window_size == 3 and type(sched.window_size) is int
    assert repr(sched) == "ProgressiveWindow(window_size=3, shift_interval=10, stride=1, start=0, rollback=False)"
    assert sched == ProgressiveWindow(window_size=3, shift_interval=10) != ProgressiveWindow(window_size=4)
    assert attrs.evolve(sched, stride=2).plan(10, 8).window == (2, 3)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        sched.window_size = 5  # a plan stays a pure function of the constructor arguments


def test_gin_binds_the_attrs_fields_and_the_validators_check_them():
    pm = parse_gin([], ["ProgressiveWindow.window_size = 2", "ProgressiveWindow.rollback = True",
                        "DecayWindow.mode = 'exp'"])
    assert pm.create("schedule", "progressive") == ProgressiveWindow(window_size=2, rollback=True)
    assert pm.create("schedule", "decay") == DecayWindow(mode="exp")
    assert pm.create("schedule", "progressive", stride=3).stride == 3  # a caller's argument beats the defaults
    pm = parse_gin([], ["ProgressiveWindow.stride = -2"])
    with pytest.raises(ValueError, match="stride must be an integer >= 0, got -2"):
        pm.create("schedule", "progressive")


# -- registration and the contract -----------------------------------------------------------------
def test_registered_names():
    pm = PluginManager()
    classes = {"all": AllSteps, "random_subset": RandomSubset, "fixed": FixedWindow,
               "progressive": ProgressiveWindow, "random": RandomWindow, "decay": DecayWindow}
    for name, cls in classes.items():
        assert isinstance(pm.create("schedule", name), cls)


class TestAllStepsContract(ScheduleContract):
    def make_schedule(self):
        return AllSteps()


class TestRandomSubsetContract(ScheduleContract):
    def make_schedule(self):
        return RandomSubset()


class TestFixedWindowContract(ScheduleContract):
    def make_schedule(self):
        return FixedWindow(start=1, window_size=4)


class TestProgressiveWindowContract(ScheduleContract):
    def make_schedule(self):
        return ProgressiveWindow(window_size=4, shift_interval=3, stride=2)


class TestProgressiveRollbackContract(ScheduleContract):
    def make_schedule(self):
        return ProgressiveWindow(window_size=3, shift_interval=2, rollback=True)


class TestRandomWindowContract(ScheduleContract):
    def make_schedule(self):
        return RandomWindow(window_size=4)


class TestDecayLinearContract(ScheduleContract):
    def make_schedule(self):
        return DecayWindow(window_size=4, mode="linear", tau_max=5, tau_min=2)


class TestDecayExpContract(ScheduleContract):
    def make_schedule(self):
        return DecayWindow(window_size=2, mode="exp", tau=4, k=0.5, l0=2)
