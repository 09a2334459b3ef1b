"""A group's shared prefix: with shared initial noise the samples of a group are one sample up to
the first SDE step, so the rollout walks those steps (and that step's model call) once per group,
and training runs the model once per group at that step (docs/algorithms.md §4).

The reference is the unshared walk (``share_prefix=False``): every sample down every step.
"""

import attrs
import pytest
import torch

from mixgrpo.core.rollout import SamplingSetup, first_of_each, rollout
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.schedules.windows import FixedWindow

from .conftest import Counting, step_gradients

PROMPTS = ["a red circle"] * 3 + ["two blue squares"] * 3 + ["a green triangle"] * 3
GROUPS = [0, 0, 0, 1, 1, 1, 2, 2, 2]
T = 8


def _walk(trainer, plan, *, share, batch_size, compression=None, prompts=PROMPTS, groups=GROUPS):
    setup = SamplingSetup(num_steps=T, shift=3.0, compression=compression, shared_noise=True, share_prefix=share)
    return rollout(trainer.backbone, prompts, torch.tensor(groups), torch.arange(len(groups)), plan, setup=setup,
                   sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver, post_solver=trainer.post_solver,
                   seed=3, iteration=0, batch_size=batch_size)


@pytest.fixture
def make_trainer(toy_config):
    def make(method="mixgrpo", *extra):
        config, pm = toy_config(method, f"TrainConfig.num_steps = {T}", *extra)
        return Trainer(config, pm)

    return make


@pytest.mark.parametrize("solvers", [("euler", "euler"), ("dpmsolver++", "dpmsolver++")])
@pytest.mark.parametrize("start", [0, 3, T - 2])
@pytest.mark.parametrize("batch_size", [4, 9])  # 4: groups of 3 straddle chunks
def test_shared_prefix_walks_the_same_trajectories_with_fewer_model_calls(make_trainer, solvers, start,
                                                                          batch_size):
    trainer = make_trainer("mixgrpo", f"TrainConfig.pre_solver = '{solvers[0]}'",
                           f"TrainConfig.post_solver = '{solvers[1]}'")
    plan = FixedWindow(start=start, window_size=2).plan(0, T)
    calls = Counting(trainer.backbone)
    want = _walk(trainer, plan, share=False, batch_size=batch_size)
    unshared_rows, calls.rows = sum(calls.rows), []
    got = _walk(trainer, plan, share=True, batch_size=batch_size)
    for name in ("x", "x_next", "log_prob", "latents", "images"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)
    # the group's samples are one up to the first SDE step: identical inputs there, not merely close
    x0 = got.x[:, 0]
    for g in range(3):
        assert all(torch.equal(x0[3 * g], x0[3 * g + k]) for k in (1, 2))
    assert not torch.equal(got.x_next[0, 0], got.x_next[1, 0])  # the SDE noise is each sample's own
    # steps 0..start are paid once per group (3 groups), the rest once per sample (9 samples)
    n, shared = len(PROMPTS), start + 1
    assert unshared_rows == n * T and want.nfe == T
    assert sum(calls.rows) == 3 * shared + n * (T - shared)
    assert got.nfe == pytest.approx(sum(calls.rows) / n)
    assert got.shared_step == start and want.shared_step is None
    assert max(calls.rows) <= batch_size


@pytest.mark.parametrize("sde", ["sde.flow", "sde.dance", "sde.cps"])
def test_every_sde_sampler_takes_the_shared_step_as_its_own(make_trainer, sde):
    """The first SDE step starts from the group's state and velocity: each sampler's transitions and
    log-probs equal the unshared walk's, and training recomputes them once per group."""
    trainer = make_trainer("mixgrpo", f"TrainConfig.sde_sampler = '{sde}'")
    plan = FixedWindow(start=3, window_size=2).plan(0, T)
    want = _walk(trainer, plan, share=False, batch_size=9)
    got = _walk(trainer, plan, share=True, batch_size=9)
    for name in ("x", "x_next", "log_prob", "latents"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)
    rows = torch.arange(9)
    log_prob = trainer._step_result(got, 3, rows)[0].log_prob
    torch.testing.assert_close(log_prob.detach(), got.log_prob[:, 0], rtol=1e-6, atol=1e-4)


def test_flash_compressed_grid_after_a_shared_prefix(make_trainer):
    trainer = make_trainer("mixgrpo_flash")
    plan = FixedWindow(start=2, window_size=2).plan(0, T)
    want = _walk(trainer, plan, share=False, batch_size=9, compression=0.4)
    got = _walk(trainer, plan, share=True, batch_size=9, compression=0.4)
    assert torch.equal(got.sigmas, want.sigmas) and len(got.sigmas) < T + 1
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-5, atol=1e-6)
    assert got.nfe == pytest.approx(want.nfe - 3 * (1 - 3 / 9))


def test_without_shared_noise_nothing_is_shared(make_trainer):
    trainer = make_trainer("flowgrpo")
    plan = FixedWindow(start=2, window_size=2).plan(0, T)
    setup = SamplingSetup(num_steps=T, shift=3.0, shared_noise=False, share_prefix=True)
    calls = Counting(trainer.backbone)
    traj = rollout(trainer.backbone, PROMPTS, torch.tensor(GROUPS), torch.arange(9), plan, setup=setup,
                   sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver, post_solver=trainer.post_solver,
                   seed=3, iteration=0, batch_size=9)
    assert sum(calls.rows) == 9 * T and traj.nfe == T and traj.shared_step is None


def test_a_group_with_two_prompts_is_refused(make_trainer):
    trainer = make_trainer()
    plan = FixedWindow(start=0, window_size=2).plan(0, T)
    prompts = [*PROMPTS[:8], "a yellow star"]
    with pytest.raises(ValueError, match=r"group 2 holds two prompts .*shared_noise=False"):
        _walk(trainer, plan, share=True, batch_size=9, prompts=prompts)


def test_training_at_the_shared_step_runs_the_model_once_per_group_with_the_same_gradient(make_trainer):
    trainer = make_trainer()
    plan = FixedWindow(start=2, window_size=2).plan(0, T)
    traj = _walk(trainer, plan, share=True, batch_size=9)
    rows = torch.tensor([0, 1, 4, 5, 6, 8])  # groups 0, 1, 2 with two samples each
    calls = Counting(trainer.backbone)
    shared_log_prob, shared_grad = step_gradients(trainer, traj, rows, step=2)
    assert calls.rows == [3]
    calls.rows = []
    each_log_prob, each_grad = step_gradients(trainer, attrs.evolve(traj, shared_step=None), rows, step=2)
    assert calls.rows == [6]
    torch.testing.assert_close(shared_log_prob, each_log_prob, rtol=1e-6, atol=1e-5)
    assert shared_grad.abs().max() > 0
    torch.testing.assert_close(shared_grad, each_grad, rtol=1e-5, atol=1e-7)
    # the on-policy ratio at the shared step: the rollout's log-probs, recomputed once per group
    torch.testing.assert_close(shared_log_prob, traj.log_prob[rows, 0], rtol=1e-6, atol=1e-4)
    # the next window step is each sample's own: no sharing there
    calls.rows = []
    step_gradients(trainer, traj, rows, step=3)
    assert calls.rows == [6]


@pytest.mark.parametrize("size", [1, 2])
def test_micro_batches_at_the_shared_step_hold_whole_groups(make_trainer, size):
    trainer = make_trainer()
    plan = FixedWindow(start=2, window_size=2).plan(0, T)
    traj = _walk(trainer, plan, share=True, batch_size=9)
    rows = torch.tensor([0, 2, 3, 4, 5, 7, 8])
    chunks = traj.micro_batches(rows, plan.train_mask(9), size)
    at_shared = [part for step, part in chunks if step == 2]
    assert len(at_shared) == -(-3 // size)  # ceil(groups / size)
    assert all(len(first_of_each(traj.group_ids[part])[0]) <= size for part in at_shared)
    assert torch.equal(torch.cat(at_shared).sort().values, rows)
    others = [part for step, part in chunks if step == 3]
    assert all(len(part) <= size for part in others) and torch.equal(torch.cat(others), rows)


def test_an_iteration_with_the_shared_prefix_trains_as_the_unshared_one(make_trainer):
    """Rewards, advantages and the update agree; the shared run pays fewer rollout calls."""
    def weights(trainer):
        return torch.cat([p.detach().flatten() for p in trainer.backbone.trainable_parameters()])

    results = {}
    for share in (True, False):
        trainer = make_trainer("mixgrpo", f"TrainConfig.share_prefix = {share}", "ProgressiveWindow.shift_interval = 1")
        before = weights(trainer)
        metrics = trainer.iteration(3)  # window at step 3: steps 0..3 shared
        results[share] = metrics, weights(trainer)
    (shared, w_shared), (each, w_each) = results[True], results[False]
    assert shared["window/start"] == 3
    reward = next(k for k in shared if k.startswith("reward/") and k.endswith("/mean"))
    assert shared[reward] == pytest.approx(each[reward], rel=1e-6)
    assert shared["policy/onpolicy_ratio_dev"] < 1e-5
    # 2 groups of 3: steps 0..3 once per group
    assert each["perf/nfe_rollout"] == T
    assert shared["perf/nfe_rollout"] == pytest.approx(T - 4 * (1 - 2 / 6))
    assert (w_shared - before).abs().max() > 1e-6  # the update moved the weights
    # AdamW moves every weight by about the learning rate (1e-3) whatever its gradient's size: agree to
    # a thousandth of one step (a gradient not summed over the group would move them by whole steps)
    torch.testing.assert_close(w_shared, w_each, rtol=0, atol=1e-6)
