"""TempFlow-GRPO (experiments/methods/tempflow_grpo.gin, ClippedGRPO.noise_weight): parity of the SDE
step with the reference's own function, the noise-aware weighted loss against a float64 re-derivation
of the reference's training lines, and the trunk rollout of its preset (core/trunk.py): samples leave one
ODE trunk per group at every branch step, each equal to its own single-sample walk, each trained at its
branch step, one model call per (group, branch step)."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import rollout
from mixgrpo.core.trainer import Trainer
from mixgrpo.core.types import StepPlan
from mixgrpo.plugins.objectives.flowgrpo import FlowGRPO
from mixgrpo.plugins.objectives.guard import StepMoments
from mixgrpo.plugins.samplers.sde import FlowSDE
from mixgrpo.plugins.schedules.branch_points import BranchPoints
from mixgrpo.testing.schedules import ScheduleContract

ROOT = Path(__file__).resolve().parents[2]
# Written by make_tempflow_reference.py: TempFlow-GRPO's own sde_step_with_logprob (repository, file and
# commit inside) run with diffusers' scheduler on float64 inputs, every step of a T = 10 grid.
REFERENCE = json.loads((Path(__file__).parent / "data" / "tempflow_reference.json").read_text())
SIGMAS = torch.tensor(REFERENCE["sigmas"], dtype=torch.float64)


def _step(record, key):
    return torch.tensor(record[key], dtype=torch.float64)


@pytest.mark.parametrize("index", range(10))
def test_the_flow_sde_step_is_the_references_at_every_step_to_fp32_rounding(index):
    record = REFERENCE["steps"][index]
    x, x_next = _step(record, "x"), _step(record, "x_next")
    sde = FlowSDE(noise_level=0.7)  # the reference's hard-coded noise level
    for v, logp, mean in (("v_old", "log_prob_old", "mean_old"), ("v_new", "log_prob_new", "mean_new")):
        res = sde.step(x, _step(record, v), SIGMAS, index, prev_sample=x_next)  # computed in fp32
        torch.testing.assert_close(res.mean.double(), _step(record, mean), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res.log_prob.double(), _step(record, logp), rtol=1e-5, atol=1e-5)
        assert float(res.std) == pytest.approx(record["std"][0], rel=1e-6)


def _reference_loss(logp_new, logp_old, adv, std, clip_range, weight=1.73):
    """The reference's training lines (scripts/train_flux_pr.py), re-derived in float64: with r the
    ratio, mean(max(−weight·std·A·r, −weight·std·A·clip(r, 1 − ε, 1 + ε)))."""
    r = torch.exp(logp_new - logp_old)
    unclipped = -weight * std * adv * r
    clipped = -weight * std * adv * torch.clamp(r, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


@pytest.mark.parametrize("clip_range", [1e-4, 10.0])  # the reference's clip, and one that never binds
def test_the_noise_aware_loss_is_the_references(clip_range):
    objective = FlowGRPO(clip_range=clip_range, kl_beta=0.0, noise_weight=1.73, adv_clip=None)
    assert objective.uses_step_moments
    adv = torch.tensor([1.2, -0.4, -0.8], dtype=torch.float64)
    clipped_any = False
    for record in REFERENCE["steps"]:
        new, old, std = _step(record, "log_prob_new"), _step(record, "log_prob_old"), record["std"][0]
        moments = StepMoments(_step(record, "mean_new"), _step(record, "mean_old"), std)
        terms, stats = objective.loss(new, old, adv, moments=moments)
        assert float(terms.mean()) == pytest.approx(float(_reference_loss(new, old, adv, std, clip_range)), rel=1e-12)
        clipped_any |= bool(stats["clipped"].any())
        # the weight is the step's std: a late step (small std) weighs less than the first (std = a)
        plain = FlowGRPO(clip_range=clip_range, kl_beta=0.0, adv_clip=None).loss(new, old, adv)[0]
        torch.testing.assert_close(terms, 1.73 * std * plain, rtol=1e-14, atol=0)
    assert clipped_any == (clip_range < 1)  # the data exercise the clipped branch at the reference's clip


def test_noise_weighting_needs_the_moments_and_a_valid_weight():
    new = old = adv = torch.zeros(3)
    with pytest.raises(ValueError, match="noise_weight=1.73 needs the step moments"):
        FlowGRPO(kl_beta=0.0, noise_weight=1.73).loss(new, old, adv)
    with pytest.raises(ValueError, match="noise_weight"):
        FlowGRPO(noise_weight=-1.0)
    assert not FlowGRPO().uses_step_moments and FlowGRPO(guard=True).uses_step_moments
    # a std per transition is read row by row
    moments = StepMoments(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([0.5, 1.0, 2.0]))
    terms, _ = FlowGRPO(kl_beta=0.0, noise_weight=2.0, adv_clip=None).loss(new, old, torch.ones(3), moments=moments)
    torch.testing.assert_close(terms, -2.0 * torch.tensor([0.5, 1.0, 2.0]))


TOY = ["TrainConfig.backbone = 'toy'", "TrainConfig.rewards = {'shapes.preference': 1.0}",
       "TrainConfig.prompts_per_iteration = 2", "TrainConfig.progress = False"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tempflow")
    cfg, pm = load_config(ROOT / "experiments/methods/tempflow_grpo.gin", [*TOY, f"TrainConfig.output_dir = '{out}'"])
    return Trainer(cfg, pm)


@pytest.fixture(scope="module")
def trunk(trainer):
    prompts, group_ids, sample_ids = trainer.local_batch(0)
    plan = trainer.plan(0, sample_ids)
    seen = []
    traj = rollout(trainer.backbone, prompts, group_ids, sample_ids, plan, setup=trainer.setup,
                   sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver, post_solver=trainer.post_solver,
                   seed=0, iteration=0, batch_size=16, keep_means=True, on_images=lambda im, rows: seen.append(rows))
    return traj, group_ids, seen


def test_the_preset_is_flowgrpo_with_a_trunk_of_nine_branch_steps(trainer):
    cfg = trainer.config
    assert trainer.objective == FlowGRPO(std="group", kl_beta=0.004, noise_weight=1.73,
                                         weights={"shapes.preference": 1.0})
    assert (cfg.method, cfg.num_steps, cfg.group_size, cfg.shared_noise) == ("TempFlow-GRPO", 10, 54, True)
    assert trainer.wants_moments
    plan = trainer.plan(3, torch.arange(108))
    assert plan.sde_steps == tuple(range(9)) and plan.trunk_branches == 6 and plan.per_sample
    # row r of a group trains branch step r // 6, whatever the iteration
    assert [plan.train_steps_for(n) for n in (0, 5, 6, 53, 54, 107)] == [(0,), (0,), (1,), (8,), (0,), (8,)]


def test_branches_leave_one_trunk_and_each_equals_its_own_single_sample_walk(trainer, trunk):
    traj, group_ids, seen = trunk
    # every (group, branch step) is a group of its own: 2 prompts x 9 steps, 6 samples each
    assert torch.bincount(torch.unique(traj.group_ids, return_inverse=True)[1]).tolist() == [6] * 18
    assert sorted((r.start, r.stop) for r in seen) == [(s, s + 6) for s in range(0, 108, 6)]  # each scored
    for row in (0, 7, 50, 54 + 33):
        j, slot = row % 54 // 6, row % 54 // 6
        siblings = torch.arange(row - row % 6, row - row % 6 + 6)
        # the siblings share the trunk's x_j and differ by their own noise
        assert torch.equal(traj.x[siblings, slot], traj.x[row, slot].expand(6, *traj.x.shape[2:]))
        assert len({tuple(x.flatten().tolist()) for x in traj.x_next[siblings, slot]}) == 6
        assert len(set(traj.nodes[siblings, slot].tolist())) == 1
        # the same sample walked alone: the ODE from the group's noise to j, its SDE step, the ODE on
        single = rollout(trainer.backbone, [traj.prompts[row]], group_ids[row:row + 1], traj.sample_ids[row:row + 1],
                         StepPlan(num_steps=10, sde_steps=(j,), train_steps=(j,)), setup=trainer.setup,
                         sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver,
                         post_solver=trainer.post_solver, seed=0, iteration=0)
        torch.testing.assert_close(single.x_next[0, 0], traj.x_next[row, slot], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single.log_prob[0, 0], traj.log_prob[row, slot], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(single.latents[0], traj.latents[row], rtol=1e-5, atol=1e-5)
    # each sample stores its one transition: the K = 9 slots of a row are views of it, not 9 copies
    for stored in (traj.x, traj.x_next, traj.mean):
        assert stored.shape[:2] == (108, 9)
        assert stored.untyped_storage().nbytes() == 108 * stored[0, 0].numel() * 4
    # one trunk of T calls per group, and 6 (T − j − 1) calls for the children of step j
    assert traj.nfe == pytest.approx((10 + 6 * sum(10 - j - 1 for j in range(9))) / 54)


def test_training_runs_once_per_branch_step_and_group_and_starts_on_policy(tmp_path):
    cfg, pm = load_config(ROOT / "experiments/methods/tempflow_grpo.gin",
                          [*TOY, f"TrainConfig.output_dir = '{tmp_path}'"])
    trainer = Trainer(cfg, pm)
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    row = trainer.iteration(0)
    assert row["policy/onpolicy_ratio_dev"] < 1e-5
    assert row["perf/nfe_train"] == pytest.approx(18 / 108 * 2)  # one call per (group, step), and the KL's
    assert row["perf/nfe_rollout"] == pytest.approx(280 / 54)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.backbone.trainable_parameters(), strict=True))
    assert math.isfinite(row["policy/grad_norm"]) and row["policy/skipped_steps"] == 0


@pytest.mark.parametrize(("binding", "message"), [
    ("TrainConfig.group_size = 8", "branches 6 samples off each group's trunk at each of the steps [0, 1, 2, 3, 4, "
                                   "5, 6, 7, 8], which makes 54 samples per group, but TrainConfig.group_size = 8: "
                                   "set TrainConfig.group_size = 54"),
    ("TrainConfig.shared_noise = False", "walks each group's one initial noise as its trunk: set "
                                         "TrainConfig.shared_noise = True"),
    ("BranchPoints.branch_steps = (2, 12)", "branches at steps [12], outside the grid of TrainConfig.num_steps = 10"),
])
def test_bad_trunk_settings_are_refused_before_the_model_loads(tmp_path, binding, message):
    bindings = [*TOY, binding, "TrainConfig.backbone = 'flux'", "FluxBackbone.path = '/nonexistent/flux'",
                f"TrainConfig.output_dir = '{tmp_path}'"]
    cfg, pm = load_config(ROOT / "experiments/methods/tempflow_grpo.gin", bindings)
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer(cfg, pm)


class TestBranchPointsContract(ScheduleContract):
    def make_schedule(self):
        return BranchPoints(branches=2)


class TestGivenBranchPointsContract(ScheduleContract):
    grid_sizes = (5, 10)

    def make_schedule(self):
        return BranchPoints(branch_steps=(0, 3), branches=3)
