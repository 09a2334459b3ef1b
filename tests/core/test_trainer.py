"""One full training iteration of every method preset on the toy backbone; resume; run directory."""

import json

import pytest
import torch

from mixgrpo.commands.report import read_metrics
from mixgrpo.core import metrics as m
from mixgrpo.core.trainer import Trainer

from .conftest import METHODS

FIXED_METRICS = [*m.POLICY, m.WINDOW_START, m.WINDOW_SIZE, m.NFE_ROLLOUT, m.NFE_TRAIN, m.ROLLOUT_S, m.REWARD_S,
                 m.TRAIN_S, m.ITERATION_S, m.PEAK_MEM_GB, m.reward("shapes.preference", "mean"),
                 m.reward("shapes.preference", "std")]


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
    steps, groups, samples = cfg.num_steps, cfg.prompts_per_iteration, cfg.prompts_per_iteration * cfg.group_size
    trained = {"flowgrpo": steps - 1, "dancegrpo": int(0.6 * (steps - 1)), "mixgrpo": 3,
               "mixgrpo_flash": 3, "mixgrpo_flash_star": 3}[method]
    # with shared noise (all but FlowGRPO) the group's samples are one up to the first SDE step (0
    # here): its model call is paid once per group in the rollout, and once per group that trains it
    shared = 0 if method == "flowgrpo" else 1
    if method == "dancegrpo":
        subsets = trainer.plan(0, torch.arange(samples)).train_steps
        at_first = len({n // cfg.group_size for n, s in enumerate(subsets) if 0 in s})
        expected_train = (sum(len(s) - (0 in s) for s in subsets) + at_first) / samples
    else:
        expected_train = trained - shared * (1 - groups / samples)
    kl_calls = 2 if method == "flowgrpo" else 1
    assert metrics["perf/nfe_train"] == pytest.approx(expected_train * kl_calls)
    walked = steps - shared * (1 - groups / samples)
    if method in ("flowgrpo", "dancegrpo", "mixgrpo"):
        assert metrics["perf/nfe_rollout"] == pytest.approx(walked)
    else:
        assert metrics["perf/nfe_rollout"] < walked  # Flash compresses the steps after the window


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
    history = resumed.train("resume")
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


def test_rewards_scored_in_the_background_overlap_the_next_chunk_and_score_the_same(toy_config, tmp_path):
    """With overlap_rewards, chunk k's images are scored in a background thread while chunk k+1 rolls
    out; the reward calls (and so the scores, advantages and update) are those of inline scoring."""
    import threading
    import time

    runs = {}
    for overlap in (False, True):
        cfg, pm = toy_config("mixgrpo", "TrainConfig.rollout_batch_size = 2",  # 6 samples: 3 chunks
                             f"TrainConfig.overlap_rewards = {overlap}",
                             f"TrainConfig.output_dir = '{tmp_path / str(overlap)}'")
        trainer = Trainer(cfg, pm)
        events = []
        velocity, reward = trainer.backbone.velocity, trainer.rewards["shapes.preference"]

        def logged_velocity(x, sigma, cond, velocity=velocity, events=events):
            events.append(("velocity", x.shape[0]))
            return velocity(x, sigma, cond)

        def slow_reward(images, prompts, reward=reward, events=events):
            events.append(("reward start", threading.current_thread() is threading.main_thread()))
            time.sleep(0.2)  # a reward model elsewhere, or a server: waiting, not computing here
            events.append(("reward end", len(prompts)))
            return reward(images, prompts)

        trainer.backbone.velocity = logged_velocity
        trainer.rewards["shapes.preference"] = slow_reward
        metrics = trainer.iteration(0)
        runs[overlap] = metrics, _weights(trainer), events
    (inline, w_inline, ev_inline), (overlapped, w_overlapped, ev_overlapped) = runs[False], runs[True]
    # the same three reward calls of two samples each, and bit-identical results
    for events in (ev_inline, ev_overlapped):
        assert [e[1] for e in events if e[0] == "reward end"] == [2, 2, 2]
    for key in ("reward/shapes.preference/mean", "reward/shapes.preference/std", "loss/policy",
                "policy/grad_norm", "policy/ratio_mean"):
        assert inline[key] == overlapped[key], key
    assert all(torch.equal(a, b) for a, b in zip(w_inline, w_overlapped))
    # inline: each reward call runs on the main thread between the chunks, no model call meanwhile
    assert all(e[1] for e in ev_inline if e[0] == "reward start")
    starts = [i for i, e in enumerate(ev_inline) if e[0] == "reward start"]
    assert all(ev_inline[i + 1][0] == "reward end" for i in starts)
    # background: off the main thread, and model calls of the next chunk happen during a reward call
    assert not any(e[1] for e in ev_overlapped if e[0] == "reward start")
    first_start = next(i for i, e in enumerate(ev_overlapped) if e[0] == "reward start")
    first_end = next(i for i, e in enumerate(ev_overlapped) if e[0] == "reward end")
    assert any(e[0] == "velocity" for e in ev_overlapped[first_start:first_end])
    # inline scoring inside the rollout loop is counted as reward time, not rollout time
    assert inline["perf/reward_s"] >= 3 * 0.2
    assert inline["perf/rollout_s"] + inline["perf/reward_s"] <= inline["perf/iteration_s"]


def test_a_lower_is_better_reward_is_trained_downwards(toy_config, tmp_path):
    """A reward declaring higher_is_better = False, scoring −s, trains exactly as one scoring s
    (its advantages are those of −(−s)); its metrics record the scores it returned."""
    from mixgrpo.core.interfaces import Reward

    runs = []
    for lower in (False, True):
        cfg, pm = toy_config("mixgrpo", f"TrainConfig.output_dir = '{tmp_path / str(lower)}'")
        trainer = Trainer(cfg, pm)
        if lower:
            original = trainer.rewards["shapes.preference"]

            class Distance(Reward):
                name, higher_is_better = "distance", False

                def __init__(self, inner):
                    self.inner = inner

                def __call__(self, images, prompts):
                    return -self.inner(images, prompts)

            trainer.rewards["shapes.preference"] = Distance(original)
        runs.append((trainer.iteration(0), _weights(trainer)))
    (higher, w_higher), (lower, w_lower) = runs
    assert lower["reward/shapes.preference/mean"] == -higher["reward/shapes.preference/mean"] != 0
    assert lower["policy/grad_norm"] == higher["policy/grad_norm"] > 0
    assert all(torch.equal(a, b) for a, b in zip(w_higher, w_lower))


def test_the_dynamic_grid_trains_on_flux_inference_sigmas(toy_config):
    """grid = 'dynamic' with TrainConfig.mu walks FLUX's inference grid σ = e^mu / (e^mu + 1/u − 1)
    (u = 1 − k/T, then 0), here re-derived in float64, and trains on it."""
    import math

    cfg, pm = toy_config("mixgrpo", "TrainConfig.grid = 'dynamic'", "TrainConfig.mu = 0.8")
    trainer = Trainer(cfg, pm)
    metrics = trainer.iteration(0)
    T = cfg.num_steps
    expected = [math.exp(0.8) / (math.exp(0.8) + 1 / (1 - k / T) - 1) for k in range(T)] + [0.0]
    assert trainer.setup.sigmas(None).tolist() == pytest.approx(expected, abs=1e-7)
    assert expected[1] != pytest.approx(3 * (1 - 1 / T) / (1 + 2 * (1 - 1 / T)))  # not the static shift-3 grid
    assert metrics["policy/onpolicy_ratio_dev"] < 1e-5 and metrics["policy/grad_norm"] > 0
