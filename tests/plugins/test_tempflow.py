"""TempFlow-GRPO (experiments/methods/tempflow_grpo.gin, ClippedGRPO.noise_weight): parity of the SDE
step with the reference's own function, the noise-aware weighted loss against a float64 re-derivation
of the reference's training lines, and the preset: one branching step per group, trained alone, with
the samples of a group sharing everything before it."""

import json
import math
from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import rollout
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.objectives.flowgrpo import FlowGRPO
from mixgrpo.plugins.objectives.guard import StepMoments
from mixgrpo.plugins.samplers.sde import FlowSDE

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


def test_the_preset_branches_each_group_at_one_step_and_trains_only_it(tmp_path):
    cfg, pm = load_config(ROOT / "experiments/methods/tempflow_grpo.gin",
                          [*TOY, f"TrainConfig.output_dir = '{tmp_path}'"])
    trainer = Trainer(cfg, pm)
    assert trainer.objective == FlowGRPO(std="group", kl_beta=0.004, noise_weight=1.73,
                                         weights={"shapes.preference": 1.0})
    assert (cfg.method, cfg.num_steps, cfg.group_size, cfg.shared_noise) == ("TempFlow-GRPO", 10, 6, True)
    assert trainer.wants_moments
    starts = set()
    for k in range(12):
        plan = trainer.plan(k, torch.arange(12))
        assert len(plan.sde_steps) == 1 and plan.train_steps == plan.sde_steps and plan.sde_steps[0] <= 8
        starts.add(plan.sde_steps[0])
    assert len(starts) > 3  # the branching step is drawn afresh each iteration, over steps 0-8
    prompts, group_ids, sample_ids = trainer.local_batch(0)
    plan = trainer.plan(0, sample_ids)
    (j,) = plan.sde_steps
    traj = rollout(trainer.backbone, prompts, group_ids, sample_ids, plan, setup=trainer.setup,
                   sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver, post_solver=trainer.post_solver,
                   seed=0, iteration=0, keep_means=True)
    for g in group_ids.unique():
        rows = group_ids == g
        # the seed group: one input to the branching step, six different SDE draws from it
        assert torch.equal(traj.x[rows, 0], traj.x[rows, 0][:1].expand_as(traj.x[rows, 0]))
        assert len({tuple(r.flatten().tolist()) for r in traj.x_next[rows, 0]}) == 6
    # the calls up to the branching step (its own included: the six draws share its input) are made
    # once per group, the ODE steps after it once per sample: j + 1 + 6 (T − j − 1) per group
    assert traj.nfe == pytest.approx((j + 1 + 6 * (10 - j - 1)) / 6)
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    row = trainer.iteration(0)
    assert row["policy/onpolicy_ratio_dev"] < 1e-5
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.backbone.trainable_parameters(), strict=True))
    assert math.isfinite(row["policy/grad_norm"]) and row["policy/skipped_steps"] == 0
