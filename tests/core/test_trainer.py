"""One full training iteration of every method preset on the toy backbone; resume; run directory."""

import json

import pytest
import torch

from mixgrpo.core.report import read_metrics
from mixgrpo.core.trainer import Trainer

from .conftest import METHODS

FIXED_METRICS = [
    "policy/ratio_mean", "policy/clipfrac", "policy/approx_kl", "loss/policy", "loss/kl",
    "window/start", "window/size", "perf/nfe_rollout", "perf/nfe_train", "perf/rollout_s",
    "perf/reward_s", "perf/train_s", "perf/iteration_s", "perf/peak_mem_gb",
    "reward/shapes.preference/mean", "reward/shapes.preference/std",
]


def _weights(trainer):
    return [p.detach().clone() for p in trainer.backbone.trainable_parameters()]


@pytest.mark.parametrize("method", METHODS)
def test_one_iteration_of_every_method_updates_the_policy(toy_config, method):
    cfg, pm = toy_config(method)
    trainer = Trainer(cfg, pm)
    before = _weights(trainer)
    metrics = trainer.iteration(0)
    after = _weights(trainer)
    for name in FIXED_METRICS:
        assert name in metrics, name
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the loss gradient reached no parameter"
    assert metrics["policy/onpolicy_ratio_dev"] < 1e-5
    assert abs(metrics["policy/ratio_mean"] - 1) < 1e-3
    steps = cfg.num_steps
    expected_train = {"flowgrpo": steps - 1, "dancegrpo": int(0.6 * (steps - 1)), "mixgrpo": 3,
                      "mixgrpo_flash": 3, "mixgrpo_flash_star": 3}[method]
    kl_calls = 2 if method == "flowgrpo" else 1
    assert metrics["perf/nfe_train"] == pytest.approx(expected_train * kl_calls)
    if method in ("flowgrpo", "dancegrpo", "mixgrpo"):
        assert metrics["perf/nfe_rollout"] == steps
    else:
        assert metrics["perf/nfe_rollout"] < steps  # Flash compresses the steps after the window


def test_minibatches_take_several_optimizer_steps(toy_config):
    cfg, pm = toy_config("mixgrpo", "TrainConfig.num_minibatches = 3")
    trainer = Trainer(cfg, pm)
    calls = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: calls.append(1) or step(*a, **k)
    trainer.iteration(0)
    assert len(calls) == 3


def test_resume_continues_exactly(toy_config, tmp_path):
    straight_cfg, pm = toy_config("mixgrpo", "TrainConfig.iterations = 2", f"TrainConfig.output_dir = '{tmp_path}/a'")
    straight = Trainer(straight_cfg, pm)
    straight.train()

    first_cfg, pm = toy_config("mixgrpo", "TrainConfig.iterations = 1", "TrainConfig.checkpoint_every = 1",
                               f"TrainConfig.output_dir = '{tmp_path}/b'")
    Trainer(first_cfg, pm).train()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "iter_000001"
    second_cfg, pm = toy_config("mixgrpo", "TrainConfig.iterations = 2", f"TrainConfig.output_dir = '{tmp_path}/b'")
    resumed = Trainer(second_cfg, pm)
    history = resumed.train(resume=True)
    assert [row["iteration"] for row in history] == [2]
    for a, b in zip(_weights(straight), _weights(resumed)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_run_directory_holds_config_metrics_samples_checkpoints(toy_config, tmp_path):
    cfg, pm = toy_config("mixgrpo", "TrainConfig.iterations = 2", "TrainConfig.eval_every = 2",
                         "TrainConfig.sample_every = 2", "TrainConfig.checkpoint_every = 2",
                         "TrainConfig.eval_prompts = 3", "TrainConfig.eval_seeds = 2", "TrainConfig.sample_prompts = 4",
                         f"TrainConfig.output_dir = '{tmp_path}/run'")
    Trainer(cfg, pm).train()
    run = tmp_path / "run"
    config = (run / "config.gin").read_text()
    assert "TrainConfig.objective = 'mixgrpo'" in config and "FlowSDE.noise_level = 0.7" in config
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert "eval/shapes.preference/mean" in rows[0] and "eval/shapes.preference/sem" in rows[2]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["iter_000000.png", "iter_000002.png"]
    ckpt = run / "checkpoints" / "iter_000002"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()


def test_tensorboard_receives_every_logged_scalar(toy_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, pm = toy_config("mixgrpo", "TrainConfig.iterations = 2", "TrainConfig.tensorboard = True",
                         f"TrainConfig.output_dir = '{tmp_path}/run'")
    trainer = Trainer(cfg, pm)
    history = trainer.train()
    trainer.close()
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    series = acc.Scalars("reward/shapes.preference/mean")
    assert [s.step for s in series] == [1, 2]
    assert [s.value for s in series] == pytest.approx([h["reward/shapes.preference/mean"] for h in history], rel=1e-6)


def test_evaluations_and_grids_follow_their_own_intervals_and_the_last_iteration(toy_config, tmp_path):
    cfg, pm = toy_config("mixgrpo", "TrainConfig.iterations = 5", "TrainConfig.eval_every = 2",
                         "TrainConfig.sample_every = 3", "TrainConfig.eval_prompts = 2", "TrainConfig.eval_seeds = 2",
                         "TrainConfig.sample_prompts = 2", f"TrainConfig.output_dir = '{tmp_path}/run'")
    Trainer(cfg, pm).train()
    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["iteration"] for r in rows if "eval/shapes.preference/mean" in r] == [0, 2, 4, 5]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "iter_000000.png", "iter_000003.png", "iter_000005.png"]
    scored = [json.loads(x)["iteration"] for x in (run / "eval_scores.jsonl").read_text().splitlines()]
    assert scored == [0, 2, 4, 5]
