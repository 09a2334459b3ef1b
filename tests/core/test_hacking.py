"""Reward hacking made visible (``mixgrpo.core.hacking``): the detection rule on synthetic rows, the
within-prompt diversity against a float64 re-derivation, the drift from the base against the
velocities computed directly, and the shapes world: a prompt-blind brightness reward trained at a high
learning rate warns (and stops the run with ``stop_on_hacking``), the compositional reward at the
demo's learning rate does not."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from mixgrpo.core import evaluation, hacking
from mixgrpo.core import metrics as m
from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import sample_ode
from mixgrpo.core.trainer import Trainer

from .conftest import ROOT, TOY

QUIET = ["TrainConfig.progress = False", "TrainConfig.trackers = []"]


def row(iteration, trained=None, held_out=None, diversity=None):
    """An evaluation row: each value a (mean, sem) pair."""
    out = {m.ITERATION: iteration}
    for name, value in (("bright", trained), ("compose", held_out)):
        if value is not None:
            out[m.evaluation(name, "mean")], out[m.evaluation(name, "sem")] = value
    if diversity is not None:
        out[m.DIVERSITY_MEAN], out[m.DIVERSITY_SEM] = diversity
    return out


# -- the rule ---------------------------------------------------------------------------------------
def test_a_trained_reward_rising_while_a_held_out_one_falls_beyond_its_se_is_a_signal():
    rows = [row(0, (0.10, 0.01), (0.50, 0.02)), {m.ITERATION: 1, "reward/bright/mean": 0.3},
            row(5, (0.90, 0.01), (0.40, 0.02))]
    signals = hacking.hacking_signals(rows, ["bright"], ["compose"])
    assert len(signals) == 1
    assert "held-out compose fell 0.5 → 0.4" in signals[0] and "trained bright rose 0.1 → 0.9" in signals[0]
    assert "iteration 0 → 5" in signals[0]
    # the SE of the fall is that of the difference: √(0.02² + 0.02²) = 0.028 < 0.1
    assert "SE 0.028" in signals[0]


def test_changes_within_the_standard_error_are_no_signal():
    # the held-out reward falls by 0.025, less than √2·0.02 = 0.028: noise, not hacking
    assert hacking.hacking_signals([row(0, (0.1, 0.01), (0.5, 0.02)), row(5, (0.9, 0.01), (0.475, 0.02))],
                                   ["bright"], ["compose"]) == []
    # a trained reward that does not rise beyond its SE makes no signal, whatever falls
    assert hacking.hacking_signals([row(0, (0.1, 0.01), (0.5, 0.02)), row(5, (0.11, 0.01), (0.1, 0.02))],
                                   ["bright"], ["compose"]) == []
    # one evaluation: nothing to compare
    assert hacking.hacking_signals([row(0, (0.1, 0.01), (0.5, 0.02))], ["bright"], ["compose"]) == []


def test_falling_diversity_is_a_signal_and_direction_follows_lower_is_better():
    rows = [row(0, (0.1, 0.01), diversity=(1.2, 0.04)), row(3, (0.9, 0.01), diversity=(0.2, 0.01))]
    [signal] = hacking.hacking_signals(rows, ["bright"], [])
    assert signal.startswith("the within-prompt diversity fell 1.2 → 0.2")
    # a lower-is-better trained reward "rises" when its score falls
    assert hacking.hacking_signals(rows, ["bright"], [], lower_is_better={"bright"}) == []
    rows = [row(0, (0.9, 0.01), diversity=(1.2, 0.04)), row(3, (0.1, 0.01), diversity=(0.2, 0.01))]
    assert len(hacking.hacking_signals(rows, ["bright"], [], lower_is_better={"bright"})) == 1


def test_a_resumed_run_compares_the_base_with_the_last_written_repeat():
    rows = [row(0, (0.1, 0.01), (0.5, 0.01)), row(4, (0.9, 0.01), (0.1, 0.01)), row(4, (0.1, 0.01), (0.5, 0.01))]
    assert hacking.hacking_signals(rows, ["bright"], ["compose"]) == []
    assert hacking.roles([{"reward/bright/mean": 1.0}, row(0, (0.1, 0.01), (0.5, 0.01), (1.0, 0.1))]) == (
        ["bright"], ["compose"])


# -- diversity ----------------------------------------------------------------------------------------
def test_diversity_is_zero_for_identical_images_and_matches_a_float64_rederivation():
    torch.manual_seed(0)
    seeds, prompts = 3, 4
    images = torch.rand(seeds * prompts, 3, 32, 32)
    out = hacking.diversity_metrics(images, seeds, "pixels")
    # the float64 re-derivation: 2×2 block means (32 → 16), unit vectors, pairwise distances per prompt
    e = images.double().reshape(-1, 3, 16, 2, 16, 2).mean(dim=(3, 5)).flatten(1)
    e = e / e.norm(dim=1, keepdim=True)
    per_prompt = []
    for p in range(prompts):
        pairs = itertools.combinations(range(seeds), 2)
        per_prompt.append(sum(float((e[i * prompts + p] - e[j * prompts + p]).norm()) for i, j in pairs) / 3)
    mean = sum(per_prompt) / prompts
    sd = math.sqrt(sum((d - mean) ** 2 for d in per_prompt) / (prompts - 1))
    assert out[m.DIVERSITY_MEAN] == pytest.approx(mean, rel=1e-5)
    assert out[m.DIVERSITY_SEM] == pytest.approx(sd / math.sqrt(prompts), rel=1e-4)
    same = images[:prompts].repeat(seeds, 1, 1, 1)  # every seed draws the same image of each prompt
    assert hacking.diversity_metrics(same, seeds, "pixels")[m.DIVERSITY_MEAN] == pytest.approx(0.0, abs=1e-6)
    assert out[m.DIVERSITY_MEAN] > 0.1
    assert hacking.diversity_metrics(images, 1, "pixels") == {} == hacking.diversity_metrics(images, 3, "none")


def test_clip_diversity_uses_the_local_models_image_embedding(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path)
    images = torch.rand(4, 3, 24, 24)
    got = hacking.embed(images, "clip", str(tmp_path))
    model = CLIPModel.from_pretrained(tmp_path).eval()
    x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", antialias=True)
    mean, std = torch.tensor(hacking.CLIP_MEAN)[:, None, None], torch.tensor(hacking.CLIP_STD)[:, None, None]
    with torch.no_grad():
        want = hacking._features(model.get_image_features(pixel_values=(x.clamp(0, 1) - mean) / std))
    assert torch.allclose(got, want / want.norm(dim=1, keepdim=True), atol=1e-5)
    twice = hacking.diversity_metrics(images[:2].repeat(2, 1, 1, 1), 2, "clip", str(tmp_path))
    assert twice[m.DIVERSITY_MEAN] == pytest.approx(0.0, abs=1e-5)


def test_bad_diversity_settings_are_refused_before_any_model_loads(tmp_path):
    config, _ = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin",
                            [*TOY, "TrainConfig.eval_diversity = 'clip'", f"TrainConfig.output_dir = '{tmp_path}'"])
    with pytest.raises(ValueError, match="eval_clip_path, a local folder"):
        Trainer(config)
    config.eval_diversity = "dino"
    with pytest.raises(ValueError, match="'pixels', 'clip', 'none'"):
        hacking.check_config(config)


# -- the drift from the base ----------------------------------------------------------------------------
def test_drift_is_zero_for_the_base_weights_and_matches_the_velocities_after_an_update(tmp_path):
    config, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin",
                             [*TOY, *QUIET, "TrainConfig.kl_base_copy = True", "TrainConfig.eval_prompts = 3",
                              f"TrainConfig.output_dir = '{tmp_path}'"])
    trainer = Trainer(config, pm)
    assert trainer.evaluate()[m.KL_BASE_MEAN] == 0.0
    with torch.no_grad():
        for p in trainer.backbone.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    probe = evaluation.drift_probe(trainer)
    sigmas = trainer.eval_setup.sigmas(None)
    assert [float(s) for s in probe.probed] == pytest.approx([float(sigmas[i]) for i in (0, 4, 7)])
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    kwargs = {"setup": trainer.eval_setup, "solver": trainer.eval_solver, "batch_size": 4}
    assert torch.equal(sample_ode(probe, prompts, seeds, **kwargs), sample_ode(trainer.backbone, prompts, seeds,
                                                                               **kwargs))
    assert probe.mean() > 0 and len(probe.per_sample) == 3  # one call of 2 samples at each probed step
    # the per-sample drift at a probed step, re-derived in float64 from the two models' velocities
    fresh = evaluation.drift_probe(trainer)
    x, sigma = torch.randn(2, *trainer.backbone.latent_shape()), torch.full((2,), float(sigmas[4]))
    cond = trainer.backbone.encode(prompts)
    fresh.velocity(x, sigma, cond)
    with torch.no_grad():
        v = trainer.backbone.velocity(x, sigma, cond).double()
        with trainer.backbone.reference():
            v_base = trainer.backbone.velocity(x, sigma, cond).double()
    assert torch.allclose(fresh.per_sample[0], (v - v_base).pow(2).flatten(1).mean(1), rtol=1e-6)
    fresh.velocity(x, torch.full((2,), 0.123), cond)  # not a probed noise level: nothing recorded
    assert len(fresh.per_sample) == 1


def test_without_a_base_copy_full_fine_tuning_reports_no_drift(tmp_path, caplog):
    config, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin",
                             [*TOY, *QUIET, "TrainConfig.eval_prompts = 2", f"TrainConfig.output_dir = '{tmp_path}'"])
    trainer = Trainer(config, pm)
    with caplog.at_level(logging.INFO, logger="mixgrpo.core.evaluation"):
        out = trainer.evaluate()
        trainer.evaluate()
    assert m.KL_BASE_MEAN not in out and m.evaluation("shapes.preference", "mean") in out
    assert sum("eval/kl_base is not reported" in r.getMessage() for r in caplog.records) == 1


# -- the shapes world ----------------------------------------------------------------------------------
SMALL = ["TrainConfig.prompts_per_iteration = 2", "TrainConfig.group_size = 4", "TrainConfig.micro_batch_size = 8",
         "TrainConfig.eval_prompts = 8", "TrainConfig.sample_every = 0", *QUIET]


def shapes_run(tmp_path, name, *bindings):
    config, pm = load_config(ROOT / "experiments" / "shapes" / "hacking.gin",
                             [*SMALL, *bindings, f"TrainConfig.output_dir = '{tmp_path / name}'"])
    trainer = Trainer(config, pm)
    trainer.train()
    trainer.close()
    return trainer


@pytest.fixture(scope="module")
def shapes_runs(tmp_path_factory):
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("hacking")
    hacked = shapes_run(tmp, "brightness", "TrainConfig.learning_rate = 1e-3", "TrainConfig.iterations = 4",
                        "TrainConfig.eval_every = 2")
    honest = shapes_run(tmp, "composition", "TrainConfig.rewards = {'shapes.composition': 1.0}",
                        "TrainConfig.eval_rewards = ('shapes.preference',)", "TrainConfig.learning_rate = 3e-5",
                        "TrainConfig.iterations = 2", "TrainConfig.eval_every = 2",
                        "TrainConfig.stop_on_hacking = False")
    return hacked, honest


def test_brightness_at_a_high_learning_rate_is_caught_and_stops_the_run(shapes_runs):
    from mixgrpo.commands.report import read_metrics, summary_lines

    hacked, _ = shapes_runs
    rows = read_metrics(hacked.out / "metrics.jsonl")
    base, latest = rows[0], rows[-1]
    assert latest[m.ITERATION] == 2  # stopped at the first evaluation after the base
    assert hacked.stopped.startswith("stopped by possible reward hacking (TrainConfig.stop_on_hacking): ")
    assert "shapes.brightness rose" in hacked.stopped and hacked.stopped.endswith("(checkpoint saved)")
    assert (hacked.out / "checkpoints" / "iter_000002").is_dir()
    assert latest["eval/shapes.brightness/mean"] > base["eval/shapes.brightness/mean"] + 0.2
    assert latest[m.DIVERSITY_MEAN] < base[m.DIVERSITY_MEAN]
    assert base[m.KL_BASE_MEAN] == 0.0 and latest[m.KL_BASE_MEAN] > 0
    summary = "\n".join(summary_lines(hacked.out))
    assert "possible reward hacking: " in summary and "within-prompt diversity: " in summary


def test_the_compositional_reward_at_the_demo_rate_shows_no_sign_in_its_first_iterations(shapes_runs):
    from mixgrpo.commands.report import read_metrics, run_signals

    _, honest = shapes_runs
    rows = read_metrics(honest.out / "metrics.jsonl")
    assert honest.stopped is None and rows[-1][m.ITERATION] == 2
    assert m.DIVERSITY_MEAN in rows[-1] and m.KL_BASE_MEAN in rows[-1]
    assert run_signals(rows) == []


def test_model_card_and_comparison_report_say_it_in_words(shapes_runs, tmp_path):
    from mixgrpo.commands.compare_report import write_report
    from mixgrpo.commands.model_card import model_card, plot_curve

    hacked, honest = shapes_runs
    card = model_card(hacked.out, hacked.config, hacked.backbone)
    assert "**Possible reward hacking**" in card and "- held-out shapes.composition fell" in card
    assert "No sign of reward hacking" in model_card(honest.out, honest.config, honest.backbone)
    assert plot_curve(hacked.out, tmp_path / "curve.png", trained=hacked.config.rewards)
    report = write_report(tmp_path / "compare", {"brightness": [hacked.out], "composition": [honest.out]},
                          metric="shapes.composition").read_text()
    section = report.split("## Reward hacking")[1].split("\n## ")[0]
    assert "- **brightness**: possible reward hacking: " in section and "- **composition**: no sign" in section
    assert (tmp_path / "compare" / "hacking_curves.png").stat().st_size > 5_000
