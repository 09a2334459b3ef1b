"""Flow-GRPO-Fast: its window schedule (plugins/schedules/fast.py) and its preset, trained on the toy world."""

from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.schedules.fast import FastWindow

ROOT = Path(__file__).resolve().parents[2]
T, GROUPS, G = 8, 2, 3
TOY = ["TrainConfig.backbone = 'toy'", f"TrainConfig.num_steps = {T}", f"TrainConfig.group_size = {G}",
       f"TrainConfig.prompts_per_iteration = {GROUPS}", "TrainConfig.micro_batch_size = 4",
       "TrainConfig.rollout_batch_size = 4", "TrainConfig.iterations = 2", "TrainConfig.learning_rate = 1e-3",
       "TrainConfig.progress = False", "TrainConfig.rewards = {'shapes.preference': 1.0}"]


def test_the_window_is_uniform_on_the_reference_range():
    # flow_grpo: start = randint(lo, hi - w), both ends included; window = start .. start + w - 1
    schedule = FastWindow(window_size=2)
    starts = [schedule.plan(k, 10, seed=3).window[0] for k in range(400)]
    assert set(starts) == {0, 1, 2, 3}  # hi = 10 // 2 = 5: the window stays in steps 0..4
    counts = torch.bincount(torch.tensor(starts))
    assert int(counts.min()) > 400 / 4 * 0.7
    plan = schedule.plan(7, 10, seed=3)
    start = plan.window[0]
    assert plan.sde_steps == plan.train_steps == (start, start + 1)
    assert schedule.plan(7, 10, seed=3) == plan  # a pure function of (iteration, seed)
    assert [FastWindow(window_size=1, range_start=2, range_end=4).plan(k, 10).window[0] for k in range(50)].count(2) > 0
    assert {FastWindow(window_size=1, range_start=2, range_end=4).plan(k, 10).window[0] for k in range(50)} == {2, 3}


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(window_size=6), "a window of 6 steps does not fit in steps 0..4"),
    (dict(range_end=12), "range_end=12 exceeds num_steps=10"),
    (dict(window_size=2, range_start=4, range_end=5), "a window of 2 steps does not fit in steps 4..4"),
])
def test_a_window_that_cannot_fit_is_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastWindow(**kwargs).plan(0, 10)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="window_size"):
        FastWindow(window_size=0)
    with pytest.raises(ValueError, match="range_end must be an integer >= 1, or None"):
        FastWindow(range_end=0)


def test_the_preset_trains_two_iterations_with_the_nfe_counted_by_hand(tmp_path):
    pm = PluginManager()  # `fast` comes through its entry point, as every built-in plugin
    cfg, pm = load_config(ROOT / "experiments/methods/flowgrpo_fast.gin",
                          [*TOY, f"TrainConfig.output_dir = '{tmp_path}'"], pm)
    assert (cfg.schedule, cfg.shared_noise, cfg.sde_sampler) == ("fast", False, "sde.flow")
    trainer = Trainer(cfg, pm)
    assert trainer.objective.clip_range == 1e-5 and trainer.objective.kl_beta == 0
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    history = trainer.train()
    assert [row["iteration"] for row in history] == [1, 2]
    for k, row in enumerate(history):
        start = trainer.plan(k, torch.arange(GROUPS * G)).window[0]
        assert row["window/start"] == start and 0 <= start <= T // 2 - 2 and row["window/size"] == 2
        # by hand: no shared noise, so every sample walks all T steps with one model call each (the
        # toy has no CFG), the ODE outside the window; training recomputes the w = 2 window steps,
        # one call each (beta = 0: no reference model)
        assert row["perf/nfe_rollout"] == T
        assert row["perf/nfe_train"] == 2
        assert row["policy/onpolicy_ratio_dev"] < 1e-5
    after = trainer.backbone.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
