"""Samplers by role: each of the sde, pre, post and eval samplers is built in the gin scope of its role,
so a scoped binding configures one role and an unscoped one every role; scopes that configure nothing
are errors; every path that builds a run's solver (trainer, ``mixgrpo sample``, the base-evaluation
signature) goes by the role."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo import PromptSet, hookimpl
from mixgrpo.commands import base_eval
from mixgrpo.commands.cli import main
from mixgrpo.commands.sample import image_name, run_sample
from mixgrpo.core.config import ConfigError, load_config, parse_gin
from mixgrpo.core.plugins import SAMPLER_ROLES, PluginManager, make_sampler
from mixgrpo.core.rollout import SamplingSetup, sample_ode
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.samplers.dpm_solver import DPMSolverPP

from .conftest import ROOT, TOY

DPM_EVERYWHERE = ["TrainConfig.pre_solver = 'dpmsolver++'", "TrainConfig.eval_solver = 'dpmsolver++'"]


def orders(trainer: Trainer) -> dict[str, int]:
    return {role: getattr(trainer, f"{role}_solver").order for role in ("pre", "post", "eval")}


def test_a_post_scoped_order_configures_the_post_window_solver_alone(toy_config):
    cfg, pm = toy_config("mixgrpo_flash", *DPM_EVERYWHERE, "post/DPMSolverPP.order = 1")
    trainer = Trainer(cfg, pm)
    assert orders(trainer) == {"pre": 2, "post": 1, "eval": 2}
    assert all(isinstance(s, DPMSolverPP) for s in (trainer.pre_solver, trainer.post_solver, trainer.eval_solver))


def test_an_unscoped_binding_reaches_every_role_and_a_scoped_one_overrides_it(toy_config):
    cfg, pm = toy_config("mixgrpo_flash", *DPM_EVERYWHERE, "DPMSolverPP.order = 1")
    assert orders(Trainer(cfg, pm)) == {"pre": 1, "post": 1, "eval": 1}
    cfg, pm = toy_config("mixgrpo_flash", *DPM_EVERYWHERE, "DPMSolverPP.order = 1", "eval/DPMSolverPP.order = 2")
    assert orders(Trainer(cfg, pm)) == {"pre": 1, "post": 1, "eval": 2}


def test_the_sde_sampler_has_its_role_too(toy_config):
    cfg, pm = toy_config("mixgrpo", "FlowSDE.noise_level = 0.5", "sde/FlowSDE.noise_level = 0.3")
    assert Trainer(cfg, pm).sde_sampler.noise_level == 0.3
    cfg, pm = toy_config("mixgrpo", "FlowSDE.noise_level = 0.5")
    assert Trainer(cfg, pm).sde_sampler.noise_level == 0.5


def test_make_sampler_builds_each_role_in_its_scope():
    pm = parse_gin([], ["DPMSolverPP.order = 2", "post/DPMSolverPP.order = 1"])
    assert {role: make_sampler(pm, role, "dpmsolver++").order for role in SAMPLER_ROLES} == \
        {"sde": 2, "pre": 2, "post": 1, "eval": 2}
    assert make_sampler(pm, "post", "dpmsolver++", order=2).order == 2  # a caller's argument wins
    with pytest.raises(ValueError, match="unknown sampler role 'posts'; roles: sde, pre, post, eval"):
        make_sampler(pm, "posts", "dpmsolver++")


def test_a_misspelled_scope_is_an_error_naming_the_roles():
    with pytest.raises(ConfigError) as err:
        parse_gin([], ["pots/DPMSolverPP.order = 1"])
    assert str(err.value).startswith("binding pots/DPMSolverPP.order: 'pots' is not a sampler role")
    assert "(sde, pre, post, eval)" in str(err.value)
    assert str(err.value).endswith("Did you mean 'post/DPMSolverPP.order'?")


def test_a_scope_on_a_class_that_is_not_a_sampler_is_an_error():
    with pytest.raises(ConfigError, match="FlowGRPO is not a sampler, so the binding would never apply; "
                                          "bind FlowGRPO.kl_beta without a scope"):
        parse_gin([], ["post/FlowGRPO.kl_beta = 0.1"])


def test_the_cli_stops_on_a_misspelled_scope_before_anything_runs(capsys, tmp_path):
    rc = main(["train", str(ROOT / "experiments" / "methods" / "mixgrpo_flash.gin"), *[a for b in TOY for a in
               ("--gin", b)], "--gin", "evl/DPMSolverPP.order = 1", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "'evl' is not a sampler role" in err and "Did you mean 'eval/DPMSolverPP.order'?" in err
    assert not (tmp_path / "run").exists()


def test_a_role_binding_on_a_class_the_role_does_not_use_is_a_warning(toy_config, caplog):
    with caplog.at_level(logging.WARNING, logger="mixgrpo.core.config"):
        toy_config("mixgrpo_flash", "post/DPMSolverPP.order = 1", "eval/DPMSolverPP.order = 1")
    # Flash's post solver is DPM-Solver++ (used); its eval solver is Euler (not)
    assert [r.getMessage() for r in caplog.records] == [
        "binding eval/DPMSolverPP.order applies to nothing: the eval role uses sampler 'euler' (Euler)"]


def test_the_base_evaluation_signature_follows_the_eval_role_only(toy_config):
    def signature(*bindings):
        cfg, pm = toy_config("mixgrpo_flash", "TrainConfig.eval_solver = 'dpmsolver++'", *bindings)
        return base_eval.signature(SimpleNamespace(config=cfg, pm=pm))

    plain = signature()
    assert signature("post/DPMSolverPP.order = 1") == plain  # another role's solver: the same evaluation
    assert signature("eval/DPMSolverPP.order = 1") != plain
    assert signature("DPMSolverPP.order = 1") != plain
    assert signature("eval/DPMSolverPP.order = 1") != signature("DPMSolverPP.order = 1")


def test_mixgrpo_sample_draws_with_the_eval_role(tmp_path):
    gin = tmp_path / "toy.gin"
    gin.write_text("\n".join([f"include '{ROOT / 'experiments' / 'runs' / 'toy_smoke.gin'}'",
                              "TrainConfig.progress = False", "TrainConfig.eval_solver = 'dpmsolver++'",
                              "DPMSolverPP.order = 2", "eval/DPMSolverPP.order = 1"]) + "\n")
    prompts = ["a red circle", "two blue squares"]
    run_sample(gin, prompts, tmp_path / "out", seeds="0", progress=False)
    config, pm = load_config(gin)
    backbone = pm.create("backbone", config.backbone)
    setup = SamplingSetup(num_steps=config.num_steps, shift=config.shift, grid=config.grid)
    levels = {order: (sample_ode(backbone, prompts, [0, 0], setup=setup, solver=DPMSolverPP(order=order))
                      .float().clamp(0, 1) * 255).round().int().permute(0, 2, 3, 1) for order in (1, 2)}
    assert not torch.equal(levels[1], levels[2])  # the two orders draw different PNGs
    for n in range(len(prompts)):
        saved = np.asarray(Image.open(tmp_path / "out" / image_name(n, 0)).convert("RGB"))
        assert torch.equal(torch.from_numpy(saved.copy()).int(), levels[1][n])


def _words(split, count, seed, iteration=None, stem="word"):  # a prompt set that is a plain function
    return [f"{split} {stem} {seed + k}" for k in range(count)]


class _PooledWords(PromptSet):
    training_only = ("pool",)

    def __init__(self, pool=None, stem="word"):
        self.pool, self.stem = pool, stem

    def __call__(self, split, count, seed, iteration=None):
        return [f"{split} {self.stem} {seed + k}" for k in range(count)]


class _WordPlugin:
    @hookimpl
    def register_prompt_sets(self, register):
        register("words", _words)
        register("pooled_words", _PooledWords)


def test_the_base_evaluation_signature_skips_what_a_prompt_set_class_declares_training_only(toy_config):
    """A ``PromptSet`` subclass's ``training_only`` parameters leave the signature as it is, its
    other parameters change it; a prompt set that is a plain function declares nothing and works."""
    pm = PluginManager(plugins=[_WordPlugin()])  # makes both gin-configurable

    def signature(prompt_set, *bindings):
        cfg, _ = toy_config("mixgrpo", *bindings)
        return base_eval.signature(SimpleNamespace(config=attrs.evolve(cfg, prompt_set=prompt_set), pm=pm))

    assert signature("words") != signature("pooled_words")  # the prompt set itself counts
    plain = signature("pooled_words")
    assert signature("pooled_words", "_PooledWords.pool = 3") == plain
    assert signature("pooled_words", "_PooledWords.stem = 'term'") != plain
    assert signature("words", "_words.stem = 'term'") != signature("words")  # a function's bindings all count
