"""Forward-process objectives (DiffusionNFT, AWM): parity with Flow-Factory's own code, the contract
mixin, and training through the engine's ODE-only rollout."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest
import torch

from mixgrpo.core.config import TrainConfig, parse_gin
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.objectives.awm import AWM
from mixgrpo.plugins.objectives.forward import stratified_grid_steps
from mixgrpo.plugins.objectives.nft import DiffusionNFT
from mixgrpo.testing import MatchingObjectiveContract

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((Path(__file__).parent / "data" / "matching_flow_factory.json").read_text())
INPUTS = {k: torch.tensor(v, dtype=torch.float64) for k, v in REFERENCE["inputs"].items()}
OUT = REFERENCE["outputs"]


def _loss(objective):
    i = INPUTS
    return objective.loss(i["v_new"], i["v_old"], i["x0"], i["noise"], i["sigma"], i["advantages"])


# -- parity with the reference (Flow-Factory a0b2bc5, their code run on the recorded inputs) -------
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_diffusionnft_loss_equals_flow_factory(beta):
    terms, stats = _loss(DiffusionNFT(beta=beta, adv_clip=5.0))
    expected = torch.tensor(OUT[f"nft_beta{beta}"]["per_sample"], dtype=torch.float64)
    torch.testing.assert_close(terms, expected, rtol=1e-12, atol=0)
    assert float(terms.mean()) == pytest.approx(OUT[f"nft_beta{beta}"]["policy_loss"], rel=1e-12)


@pytest.mark.parametrize("weighting", ["uniform", "t", "t**2", "huber", "ghuber"])
@pytest.mark.parametrize("clip", [1e-4, 1.0])
def test_awm_likelihood_and_loss_equal_flow_factory(weighting, clip):
    ref = OUT[f"awm_{'Uniform' if weighting == 'uniform' else weighting}_clip{clip}"]
    objective = AWM(weighting=weighting, ghuber_power=0.25, clip_range=clip, adv_clip=1.0)
    i = INPUTS
    for v, key in ((i["v_new"], "log_prob_new"), (i["v_old"], "log_prob_old")):
        # the reference returns float32 log-likelihoods
        torch.testing.assert_close(objective.log_likelihood(v, i["x0"], i["noise"], i["sigma"]),
                                   torch.tensor(ref[key], dtype=torch.float64), rtol=2e-7, atol=1e-9)
    terms, _ = _loss(objective)
    torch.testing.assert_close(terms, torch.tensor(ref["per_sample"], dtype=torch.float64), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("name", "count", "fraction", "first"),
                         [("discrete_0.5_4", 4, 0.5, True), ("discrete_wo_init_0.9_6", 6, 0.9, False)])
def test_sigma_draws_equal_flow_factory_discrete_sampler(name, count, fraction, first):
    data = OUT["discrete"]
    grid = torch.tensor(data["grid"] + [0.0], dtype=torch.float64)
    steps = stratified_grid_steps(grid, count, fraction, first, torch.Generator().manual_seed(data["generator_seed"]))
    torch.testing.assert_close(grid[steps], torch.tensor(data["draws"][name], dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_diffusionnft_float64_rederivation_of_beta_one():
    """β = 1: v⁺ = v_θ and v⁻ = 2·v_old − v_θ, so with r = 1 the loss is the x0-space error of v_θ."""
    i = INPUTS
    adv = torch.full((6,), 5.0, dtype=torch.float64)  # r = 1
    terms, _ = DiffusionNFT(beta=1.0, adv_clip=5.0).loss(i["v_new"], i["v_old"], i["x0"], i["noise"], i["sigma"], adv)
    s = i["sigma"].view(-1, 1, 1, 1)
    err = (1 - s) * i["x0"] + s * i["noise"] - s * i["v_new"] - i["x0"]  # = σ·(ε − x0 − v_θ)
    expected = 5.0 * (err ** 2).flatten(1).mean(1) / err.abs().flatten(1).mean(1)
    torch.testing.assert_close(terms, expected, rtol=1e-12, atol=0)


# -- the contract mixin ----------------------------------------------------------------------------
class TestDiffusionNFTContract(MatchingObjectiveContract):
    def make_objective(self):
        return DiffusionNFT(beta=1.0)


class TestDiffusionNFTHalfBetaContract(MatchingObjectiveContract):
    def make_objective(self):
        return DiffusionNFT(beta=0.5, kl_beta=0.1, num_timesteps=2)


class TestAWMContract(MatchingObjectiveContract):
    def make_objective(self):
        return AWM(weighting="ghuber", clip_range=1.0, adv_clip=5.0, kl_beta=1e-4)


# -- training through the engine -------------------------------------------------------------------
SMOKE = ["include 'backbones/toy.gin'", "TrainConfig.num_steps = 6", "TrainConfig.group_size = 4",
         "TrainConfig.prompts_per_iteration = 2", "TrainConfig.rollout_batch_size = 8",
         "TrainConfig.micro_batch_size = 3", "TrainConfig.num_minibatches = 2", "TrainConfig.iterations = 2",
         "TrainConfig.learning_rate = 1e-3", "TrainConfig.rewards = {'shapes.preference': 1.0}",
         "TrainConfig.progress = False", "TrainConfig.tensorboard = False"]


def _trainer(tmp_path, preset, *extra):
    gin.clear_config()
    parse_gin([str(ROOT / "experiments" / "methods" / preset)], SMOKE + [f"TrainConfig.output_dir = '{tmp_path}'",
                                                                          *extra])
    return Trainer(TrainConfig())


@pytest.mark.parametrize(("preset", "draws", "calls"), [("diffusionnft.gin", 4, 2), ("awm.gin", 6, 3)])
def test_presets_train_on_policy_with_hand_counted_nfe(tmp_path, preset, draws, calls):
    """2 iterations, 2 minibatches: the first minibatch is on-policy (ratio 1); a rollout is T ODE
    calls; training is, per sample, K velocities before the updates, K with grad, and K of the frozen
    reference when the preset's KL is on (AWM: kl_beta 1e-4)."""
    trainer = _trainer(tmp_path, preset)
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    rows = trainer.train()
    gin.clear_config()
    assert len(rows) == 2
    for row in rows:
        assert row["policy/onpolicy_ratio_dev"] < 1e-6
        assert row["perf/nfe_rollout"] == 6.0
        assert row["perf/nfe_train"] == draws * calls
        assert row["window/size"] == 0.0
        assert row["policy/skipped_steps"] == 0.0
    after = trainer.backbone.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_grouped_samples_differ_without_shared_noise(tmp_path):
    trainer = _trainer(tmp_path, "diffusionnft.gin")
    prompts, group_ids, sample_ids = trainer.local_batch(0)
    from mixgrpo.core.rollout import rollout

    traj = rollout(trainer.backbone, prompts, group_ids, sample_ids, trainer.plan(0, sample_ids),
                   setup=trainer.setup, sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver,
                   post_solver=trainer.post_solver, seed=0, iteration=0, batch_size=8)
    gin.clear_config()
    assert traj.x.shape[1] == 0 and traj.sde_steps == ()
    assert not torch.allclose(traj.latents[0], traj.latents[1])


# -- bad input: refused before any model loads ------------------------------------------------------
@pytest.mark.parametrize(("preset", "extra", "message"), [
    ("diffusionnft.gin", "TrainConfig.schedule = 'progressive'", "TrainConfig.schedule = 'ode'"),
    ("awm.gin", "TrainConfig.shared_noise = True", "TrainConfig.shared_noise = False"),
    ("flowgrpo.gin", "TrainConfig.schedule = 'ode'", "forward-process objective (awm, diffusionnft"),
])
def test_unusable_settings_are_refused_before_the_backbone_loads(tmp_path, monkeypatch, preset, extra, message):
    from mixgrpo.core import plugins

    def no_models(self, kind, name, **kwargs):  # nothing may be built past the checks
        if kind in ("backbone", "reward"):
            raise AssertionError(f"{kind} {name!r} was built before the check")
        return original(self, kind, name, **kwargs)

    original = plugins.PluginManager.create
    monkeypatch.setattr(plugins.PluginManager, "create", no_models)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        _trainer(tmp_path, preset, extra)
    gin.clear_config()
