"""The rollout engine: keyed noise, stored transitions, Flash grids, and the on-policy check."""

import pytest
import torch

from mixgrpo.core.rollout import SamplingSetup, rollout
from mixgrpo.core.sigmas import num_post_window_points

from .conftest import METHODS


def _components(cfg, pm):
    return dict(
        backbone=pm.create("backbone", cfg.backbone),
        sde=pm.create("sampler", cfg.sde_sampler),
        pre=pm.create("sampler", cfg.pre_solver),
        post=pm.create("sampler", cfg.post_solver),
        schedule=pm.create("schedule", cfg.schedule),
        setup=SamplingSetup(num_steps=cfg.num_steps, shift=cfg.shift, compression=cfg.compression,
                            shared_noise=cfg.shared_noise),
    )


def _run(c, plan, prompts, groups, *, batch_size=4, iteration=0, shared=None):
    setup = c["setup"]
    if shared is not None:
        setup = SamplingSetup(num_steps=setup.num_steps, shift=setup.shift, compression=setup.compression,
                              shared_noise=shared)
    return rollout(c["backbone"], prompts, torch.tensor(groups), torch.arange(len(groups)), plan, setup=setup,
                   sde_sampler=c["sde"], pre_solver=c["pre"], post_solver=c["post"], seed=7,
                   iteration=iteration, batch_size=batch_size)


PROMPTS = ["a red circle"] * 3 + ["two blue squares"] * 3
GROUPS = [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("micro", [1, 4])
def test_recomputed_log_probs_equal_rollout_log_probs(toy_config, method, micro):
    """Ratio = 1 before any update, for every method and micro-batch size (docs/algorithms.md §3)."""
    cfg, pm = toy_config(method)
    c = _components(cfg, pm)
    plan = c["schedule"].plan(3, cfg.num_steps, len(PROMPTS))
    traj = _run(c, plan, PROMPTS, GROUPS, batch_size=6)
    assert traj.sde_steps == plan.sde_steps
    assert traj.log_prob.shape == (6, len(plan.sde_steps))
    for step in plan.all_train_steps():
        for rows in torch.arange(6).split(micro):
            slot = traj.slot(step)
            sigma = torch.full((len(rows),), float(traj.sigmas[step]))
            v = c["backbone"].velocity(traj.x[rows, slot], sigma, traj.cond.select(rows))
            res = c["sde"].step(traj.x[rows, slot], v, traj.sigmas, step, prev_sample=traj.x_next[rows, slot])
            ratio = torch.exp(res.log_prob - traj.log_prob[rows, slot])
            assert (ratio - 1).abs().max() < 1e-5, (method, step)


def test_shared_initial_noise_is_keyed_by_group(toy_config):
    cfg, pm = toy_config("mixgrpo")
    c = _components(cfg, pm)
    plan = c["schedule"].plan(0, cfg.num_steps)  # window at 0: x at step 0 is x_T
    shared = _run(c, plan, PROMPTS, GROUPS, shared=True)
    x_t = shared.x[:, 0]
    assert torch.equal(x_t[0], x_t[1]) and torch.equal(x_t[0], x_t[2])
    assert not torch.allclose(x_t[0], x_t[3])
    assert not torch.allclose(shared.x_next[0, 0], shared.x_next[1, 0])  # SDE noise still differs
    private = _run(c, plan, PROMPTS, GROUPS, shared=False)
    assert not torch.allclose(private.x[0, 0], private.x[1, 0])


def test_trajectories_do_not_depend_on_batch_size(toy_config):
    cfg, pm = toy_config("dancegrpo")
    c = _components(cfg, pm)
    plan = c["schedule"].plan(1, cfg.num_steps, 6)
    a = _run(c, plan, PROMPTS, GROUPS, batch_size=1)
    b = _run(c, plan, PROMPTS, GROUPS, batch_size=6)
    torch.testing.assert_close(a.x_next, b.x_next, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.log_prob, b.log_prob, atol=1e-5, rtol=1e-5)


def test_consecutive_sde_steps_chain(toy_config):
    cfg, pm = toy_config("flowgrpo")
    c = _components(cfg, pm)
    plan = c["schedule"].plan(0, cfg.num_steps)
    traj = _run(c, plan, PROMPTS, GROUPS)
    assert traj.sde_steps == tuple(range(cfg.num_steps))
    assert torch.equal(traj.x[:, 1:], traj.x_next[:, :-1])  # x_{i+1} of step i is x of step i+1
    assert torch.equal(traj.x_next[:, -1], traj.latents)


@pytest.mark.parametrize("iteration", [0, 4, 40])
def test_flash_rollout_walks_the_compressed_grid(toy_config, iteration):
    cfg, pm = toy_config("mixgrpo_flash", "ProgressiveWindow.shift_interval = 2",
                         "TrainConfig.num_steps = 20", "TrainConfig.compression = 0.4")
    c = _components(cfg, pm)
    plan = c["schedule"].plan(iteration, cfg.num_steps)
    start, size = plan.window
    traj = _run(c, plan, PROMPTS, GROUPS)
    last = start + size - 1
    n_post = num_post_window_points(cfg.num_steps, last, 0.4)
    expected = start + size + (n_post - 1) if last + 1 < cfg.num_steps else cfg.num_steps
    assert traj.sigmas.numel() - 1 == min(expected, cfg.num_steps)
    # the 2 groups of 3 share steps 0..start (their noise is shared): paid once per group
    assert traj.nfe == pytest.approx(min(expected, cfg.num_steps) - (start + 1) * (1 - 2 / 6))
    assert traj.sigmas[-1] == 0
    full = c["setup"].sigmas(None)
    torch.testing.assert_close(traj.sigmas[: last + 2], full[: last + 2])
