"""GRPO-Guard's regulated ratio (plugins/objectives/guard.py, ClippedGRPO.guard): parity with the
reference implementation's own code, the properties it is built for, and its preset."""

import json
import math
from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.objectives.base import ClippedGRPO
from mixgrpo.plugins.objectives.dancegrpo import DanceGRPO
from mixgrpo.plugins.objectives.flowgrpo import FlowGRPO
from mixgrpo.plugins.objectives.guard import StepMoments, guard_log_ratio
from mixgrpo.plugins.objectives.mixgrpo import MixGRPO
from mixgrpo.plugins.samplers.sde import FlowSDE

ROOT = Path(__file__).resolve().parents[2]
# Written by running X-GenGroup/Flow-Factory's own GRPOGuardTrainer.optimize lines (source, path and
# commit inside the file) on fixed float64 inputs: the lines themselves are in its "code_run".
REFERENCE = json.loads((Path(__file__).parent / "data" / "grpo_guard_flow_factory.json").read_text())


def _reference_inputs():
    inp = REFERENCE["inputs"]
    shape = inp["shape"]
    as64 = lambda key: torch.tensor(inp[key], dtype=torch.float64)  # noqa: E731
    s = inp["std_dev_t"] * math.sqrt(-inp["dt"])  # the reference's scale_factor: the step std g·√Δ
    moments = StepMoments(as64("mean_new").reshape(shape), as64("mean_old").reshape(shape), s)
    return inp, moments, as64("log_prob_new"), as64("log_prob_old"), as64("advantages")


def test_guarded_ratio_and_loss_match_the_reference_to_float64_rounding():
    inp, moments, new, old, adv = _reference_inputs()
    objective = FlowGRPO(clip_range=inp["clip_range"], kl_beta=0.0, guard=True)
    terms, stats = objective.loss(new, old, adv, moments=moments)
    torch.testing.assert_close(stats["ratio"], torch.tensor(REFERENCE["outputs"]["ratio"], dtype=torch.float64),
                               rtol=1e-13, atol=0)
    assert float(terms.mean()) == pytest.approx(REFERENCE["outputs"]["policy_loss_mean"], rel=1e-12)
    # the reference's ratios are off 1 by more than the clip: the data exercise the clipped branch
    assert float(stats["clipped"].sum()) > 0


def test_the_reference_inputs_are_a_flow_sde_step_of_mixgrpo():
    # the reference's scale_factor is StepResult.std of sde.flow at the same σ and noise level
    inp, moments, new, old, _ = _reference_inputs()
    sigmas = torch.tensor([1.0, inp["sigma"], inp["sigma_next"], 0.0])
    x_next = torch.tensor(inp["x_next"], dtype=torch.float64).reshape(inp["shape"])
    x = torch.zeros_like(x_next, dtype=torch.float32)
    res = FlowSDE(noise_level=inp["noise_level"]).step(x, torch.zeros_like(x), sigmas, 1, prev_sample=x)
    assert float(res.std) == pytest.approx(moments.std, rel=1e-6)
    # and its log-probs are the Gaussian ones of the means it holds (so the moments belong to them)
    s = moments.std
    lp = (-(x_next - moments.mean_old) ** 2 / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1)
    torch.testing.assert_close(lp.mean(1), old, rtol=1e-14, atol=0)


def test_guard_removes_the_left_shift_and_the_one_over_std_scale():
    # float64 re-derivation: log r = -mean(d²)/(2s²) + mean(d·ξ)/s; the guard gives mean(d·ξ)
    gen = torch.Generator().manual_seed(1)
    mean_old = torch.randn(4096, 16, generator=gen, dtype=torch.float64)
    d = 0.02 * torch.randn(4096, 16, generator=gen, dtype=torch.float64)
    xi = torch.randn(4096, 16, generator=gen, dtype=torch.float64)
    for s in (0.02, 0.3):
        x_next = mean_old + s * xi
        lp = lambda mu: (-(x_next - mu) ** 2 / (2 * s * s) - math.log(s)).mean(1)  # noqa: E731,B023
        plain = lp(mean_old + d) - lp(mean_old)
        guarded = guard_log_ratio(lp(mean_old + d), lp(mean_old), StepMoments(mean_old + d, mean_old, s))
        torch.testing.assert_close(guarded, (d * xi).mean(1), rtol=1e-9, atol=1e-15)
        bias = float((d * d).mean() / (2 * s * s))
        assert float(plain.mean()) == pytest.approx(-bias, rel=0.2)  # the plain ratio is shifted left
        assert abs(float(guarded.mean())) < 3 * float(guarded.std()) / math.sqrt(4096)  # centred on 0


def test_on_policy_ratio_is_one_and_the_gradient_is_std_times_the_plain_one():
    # a real sde.flow step of a linear "policy": rollout, then the recomputation with the same weights
    sampler, sigmas = FlowSDE(noise_level=0.7), torch.tensor([1.0, 0.8, 0.5, 0.0])
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    w = torch.tensor(0.3, requires_grad=True)
    with torch.no_grad():
        rollout = sampler.step(x, w * x, sigmas, 1, noise=torch.randn_like(x))
    grads = {}
    for guard in (False, True):
        res = sampler.step(x, w * x, sigmas, 1, prev_sample=rollout.prev_sample)
        moments = StepMoments(res.mean, rollout.mean, res.std)
        terms, stats = MixGRPO(guard=guard).loss(res.log_prob, rollout.log_prob, torch.tensor([1.0, -0.5, 2.0]),
                                                 moments=moments)
        assert torch.equal(stats["ratio"], torch.ones(3))
        (grads[guard],) = torch.autograd.grad(terms.sum(), w)
    torch.testing.assert_close(grads[True], float(rollout.std) * grads[False], rtol=1e-5, atol=0)
    assert float(grads[False]) != 0


@pytest.mark.parametrize("cls", [FlowGRPO, DanceGRPO, MixGRPO, ClippedGRPO])
def test_every_objective_switches_it_on_by_one_field_and_off_changes_nothing(cls):
    _, moments, new, old, adv = _reference_inputs()
    plain, plain_stats = cls(kl_beta=0.0).loss(new, old, adv)
    ignored, _ = cls(kl_beta=0.0).loss(new, old, adv, moments=moments)  # without guard the moments are unused
    assert torch.equal(plain, ignored)
    assert not cls().uses_step_moments and cls(guard=True).uses_step_moments
    guarded, stats = cls(kl_beta=0.0, guard=True).loss(new, old, adv, moments=moments)
    assert not torch.allclose(stats["ratio"], plain_stats["ratio"])
    with pytest.raises(ValueError, match="guard=True needs the step moments"):
        cls(kl_beta=0.0, guard=True).loss(new, old, adv)


def test_bad_moments_are_refused_with_the_fix():
    _, moments, new, old, _ = _reference_inputs()
    with pytest.raises(ValueError, match="must have the same shape, with 4 rows"):
        guard_log_ratio(new, old, StepMoments(moments.mean_new[:3], moments.mean_old[:3], 0.1))
    with pytest.raises(ValueError, match="std s > 0: an ODE step"):
        guard_log_ratio(new, old, StepMoments(moments.mean_new, moments.mean_old, 0.0))
    with pytest.raises(ValueError, match="3 values for 4 transitions"):
        guard_log_ratio(new, old, StepMoments(moments.mean_new, moments.mean_old, torch.ones(3)))


def test_the_preset_is_flowgrpo_with_the_guard(tmp_path):
    toy = ["TrainConfig.backbone = 'toy'", "TrainConfig.rewards = {'shapes.preference': 1.0}",
           "TrainConfig.num_steps = 4", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
           "TrainConfig.progress = False", f"TrainConfig.output_dir = '{tmp_path}'"]
    cfg, pm = load_config(ROOT / "experiments/methods/grpo_guard.gin", toy)
    trainer = Trainer(cfg, pm)
    assert trainer.objective == FlowGRPO(kl_beta=0.04, guard=True, weights={"shapes.preference": 1.0})
    assert (cfg.method, cfg.schedule, cfg.sde_sampler, cfg.shared_noise) == ("GRPO-Guard", "all", "sde.flow", False)
    assert trainer.wants_moments
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    rows = [trainer.iteration(k) for k in range(2)]
    # the rollout's stored means are the ones training recomputes: before the first update the
    # guarded ratio, exp(s·Δlogp + mean(Δμ²)/(2s)), is 1 to float rounding
    for row in rows:
        assert row["policy/onpolicy_ratio_dev"] < 1e-5
        assert row["perf/nfe_train"] == 2 * 3  # 3 trained steps of 4, each with the reference (KL 0.04)
    after = trainer.backbone.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_only_a_guarded_objective_makes_the_rollout_keep_the_step_means(tmp_path):
    toy = ["TrainConfig.backbone = 'toy'", "TrainConfig.rewards = {'shapes.preference': 1.0}",
           "TrainConfig.num_steps = 4", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
           "TrainConfig.progress = False", f"TrainConfig.output_dir = '{tmp_path}'"]
    from mixgrpo.core.rollout import rollout

    for guard in (True, False):
        cfg, pm = load_config(ROOT / "experiments/methods/grpo_guard.gin", [*toy, f"FlowGRPO.guard = {guard}"])
        trainer = Trainer(cfg, pm)
        prompts, group_ids, sample_ids = trainer.local_batch(0)
        traj = rollout(trainer.backbone, prompts, group_ids, sample_ids, trainer.plan(0, sample_ids),
                       setup=trainer.setup, sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver,
                       post_solver=trainer.post_solver, seed=0, iteration=0, keep_means=trainer.wants_moments)
        if not guard:
            assert traj.mean is None
            continue
        assert traj.mean.shape == traj.x.shape
        # the stored mean is the SDE step's mean at the stored input, recomputed here
        slot, step = 1, traj.sde_steps[1]
        v = trainer.backbone.velocity(traj.x[:, slot], torch.full((len(traj),), float(traj.sigmas[step])), traj.cond)
        res = trainer.sde_sampler.step(traj.x[:, slot], v, traj.sigmas, step, prev_sample=traj.x_next[:, slot])
        torch.testing.assert_close(traj.mean[:, slot], res.mean.float(), rtol=1e-5, atol=1e-6)
