"""OP-GRPO's off-policy replay (core/replay.py, experiments/methods/op_grpo.gin): which rows replay,
that a replayed row reuses its stored prefix bit for bit and the current policy redraws the rest,
the π_old log-probs and the sequence-level importance weight against a float64 re-derivation, what
enters the buffer, the buffer in checkpoints (a resumed run equals an uninterrupted one), and the
settings refused before the model loads."""

import math
import re
from pathlib import Path

import attrs
import pytest
import torch

from mixgrpo.commands.report import read_metrics
from mixgrpo.core.config import load_config
from mixgrpo.core.replay import Entry, ReplayBuffer
from mixgrpo.core.rollout import step_noise
from mixgrpo.core.trainer import Trainer
from mixgrpo.core.types import ReplaySpec
from mixgrpo.plugins.objectives.opgrpo import OPGRPO
from mixgrpo.plugins.prompts import ShapesPrompts
from mixgrpo.testing.objectives import ObjectiveContract

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "experiments" / "methods" / "op_grpo.gin"
TAU = 5
# two prompts drawn from a pool of two: every prompt comes back every iteration
TOY = ["TrainConfig.backbone = 'toy'", "TrainConfig.num_steps = 8", "TrainConfig.group_size = 3",
       "TrainConfig.prompts_per_iteration = 2", "TrainConfig.micro_batch_size = 4",
       "TrainConfig.rollout_batch_size = 4", "TrainConfig.learning_rate = 1e-3", "TrainConfig.progress = False",
       "TrainConfig.rewards = {'shapes.preference': 1.0}", "ShapesPrompts.pool = 2", "OPGRPO.kl_beta = 0.0"]


def make_trainer(out, *extra):
    cfg, pm = load_config(PRESET, [*TOY, f"TrainConfig.output_dir = '{out}'", *extra])
    return Trainer(cfg, pm)


@pytest.fixture(scope="module")
def after_one(tmp_path_factory):
    """A trainer after iteration 1 (the buffer holds both prompts), and that iteration's rollout."""
    trainer = make_trainer(tmp_path_factory.mktemp("replay"))
    trainer.iteration(0)
    return trainer


def test_the_preset_is_flowgrpo_with_a_buffer(after_one):
    assert isinstance(after_one.objective, OPGRPO)
    assert after_one.objective.replay == ReplaySpec(truncate_step=TAU, capacity=512, max_age=10)
    assert after_one.config.schedule == "all" and not after_one.config.shared_noise
    assert len(after_one.replay) == 2


def test_each_group_stores_its_best_sample(tmp_path):
    trainer = make_trainer(tmp_path)
    prompts, group_ids, sample_ids = trainer.local_batch(0)
    seen = {}
    original = trainer.replay.admit

    def spy(tr, traj, scores, k):
        seen.update(traj=traj, scores=scores)
        original(tr, traj, scores, k)

    trainer.replay.admit = spy
    trainer.iteration(0)
    traj, reward = seen["traj"], seen["scores"]["shapes.preference"]
    for prompt in set(prompts):
        rows = [n for n in range(len(traj)) if traj.prompts[n] == prompt]
        best = max(rows, key=lambda n: float(reward[n]))
        entry = trainer.replay.entries[prompt]
        assert entry.reward == pytest.approx(float(reward[best])) and entry.iteration == 0
        assert torch.equal(entry.states[:TAU], traj.x[best, :TAU])
        assert torch.equal(entry.states[TAU], traj.x_next[best, TAU - 1])
        assert torch.equal(entry.log_prob, traj.log_prob[best, :TAU])


def test_a_replayed_row_reuses_its_prefix_and_the_current_policy_draws_the_rest(after_one):
    trainer, k = after_one, 1
    prompts, group_ids, sample_ids = trainer.local_batch(k)
    arranged, groups, samples, replayed = trainer.replay.arrange(prompts, group_ids, sample_ids, k)
    assert replayed == 2  # one row per group, each group's last, moved after the fresh rows
    assert samples[-2:].tolist() == [2, 5] and sorted(samples[:-2].tolist()) == [0, 1, 3, 4]
    plan = trainer.plan(k, samples)
    trainer.backbone.module.eval()
    traj = trainer.replay.rollout(trainer, arranged, groups, samples, plan, replayed, k)
    sde, backbone, sigmas = trainer.sde_sampler, trainer.backbone, traj.sigmas
    torch.set_grad_enabled(False)
    for row in (4, 5):
        entry = trainer.replay.entries[arranged[row]]
        # steps 0 … τ−1: the stored transitions, bit for bit; their log-probs are π_old's, recomputed
        assert torch.equal(traj.x[row, :TAU], entry.states[:TAU])
        assert torch.equal(traj.x_next[row, :TAU], entry.states[1:])
        cond = backbone.encode([arranged[row]])
        old = []
        for i in range(TAU):
            v = backbone.velocity(entry.states[i:i + 1], torch.full((1,), float(sigmas[i])), cond)
            old.append(float(sde.step(entry.states[i:i + 1], v, sigmas, i, prev_sample=entry.states[i + 1:i + 2])
                             .log_prob))
        torch.testing.assert_close(traj.log_prob[row, :TAU], torch.tensor(old), rtol=0, atol=1e-5)
        # steps τ … T−1: walked from x_τ with the row's own noise of this iteration
        x = entry.states[TAU:TAU + 1]
        for i in range(TAU, 8):
            v = backbone.velocity(x, torch.full((1,), float(sigmas[i])), cond)
            noise = step_noise(backbone.latent_shape(), samples[row:row + 1], trainer.config.seed, k, i)
            res = sde.step(x, v, sigmas, i, noise=noise)
            torch.testing.assert_close(traj.x[row, i], x[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(traj.log_prob[row, i], res.log_prob[0], rtol=1e-5, atol=1e-4)
            x = res.prev_sample
        torch.testing.assert_close(traj.latents[row], x[0], rtol=1e-5, atol=1e-6)
        # the weight: exp Σ_{i<τ} (log π_old − log π_b), re-derived in float64
        expected = math.exp(sum(o - b for o, b in zip(old, entry.log_prob.double().tolist(), strict=True)))
        assert float(traj.weight[row]) == pytest.approx(expected, rel=1e-5)
    torch.set_grad_enabled(True)
    assert traj.weight[:4].tolist() == [1.0] * 4
    # a replayed row costs T − τ walked steps and τ calls for π_old: T, as a fresh one
    assert traj.nfe == pytest.approx(8.0)


def test_the_advantages_carry_the_weight_and_training_starts_on_policy(after_one, tmp_path):
    trainer = make_trainer(tmp_path)
    first = trainer.iteration(0)
    assert first["replay/fraction"] == 0 and math.isnan(first["replay/weight_mean"])
    row = trainer.iteration(1)
    assert row["replay/fraction"] == pytest.approx(2 / 6) and row["replay/buffer_size"] == 2
    assert row["policy/onpolicy_ratio_dev"] < 1e-5  # π_old of the reused steps is this iteration's policy
    assert 0 < row["replay/weight_mean"] <= row["replay/weight_max"]
    # the trainer multiplies each sample's advantages by its weight
    prompts, group_ids, sample_ids = trainer.local_batch(2)
    arranged, groups, samples, replayed = trainer.replay.arrange(prompts, group_ids, sample_ids, 2)
    traj = trainer.replay.rollout(trainer, arranged, groups, samples, trainer.plan(2, samples), replayed, 2)
    scores = {"shapes.preference": torch.linspace(0.1, 0.6, 6)}
    weighted = trainer.advantages(scores, traj)
    plain = trainer.advantages(scores, attrs.evolve(traj, weight=None))
    torch.testing.assert_close(weighted, plain * traj.weight[:, None], rtol=0, atol=0)


@pytest.mark.parametrize(("mode", "cap", "expected"), [
    ("product", None, [math.exp(0.3 - 0.1 + 0.2), math.exp(-1.5)]),
    ("geometric", None, [math.exp((0.3 - 0.1 + 0.2) / 3), math.exp(-0.5)]),
    ("product", 1.2, [1.2, math.exp(-1.5)]),
])
def test_the_importance_weight_is_its_float64_re_derivation(mode, cap, expected):
    buffer = ReplayBuffer(ReplaySpec(truncate_step=3, weight=mode, max_weight=cap))
    old = torch.tensor([[-2.0, -3.0, -1.0], [-1.0, -1.0, -1.0]])
    behaviour = torch.tensor([[-2.3, -2.9, -1.2], [-0.5, -0.5, -0.5]])
    torch.testing.assert_close(buffer.weight(old, behaviour), torch.tensor(expected, dtype=torch.float32))


def test_an_entry_is_replaced_by_a_better_or_newer_sample_and_ages_out():
    buffer = ReplayBuffer(ReplaySpec(truncate_step=1, capacity=2, max_age=3))

    def entry(reward, iteration):
        return Entry(torch.full((2, 1), reward), torch.zeros(1), reward, iteration)

    buffer._offer("a", entry(0.5, 0))
    buffer._offer("a", entry(0.4, 1))  # worse: kept out
    assert buffer.entries["a"].reward == 0.5
    buffer._offer("a", entry(0.5, 2))  # as good: the newer one
    assert buffer.entries["a"].iteration == 2
    assert buffer.live("a", 5) is not None and buffer.live("a", 6) is None  # replayed up to max_age later
    buffer._offer("a", entry(0.1, 6))  # the held one is too old: any sample replaces it
    assert buffer.entries["a"].reward == 0.1
    buffer._offer("b", entry(0.2, 6))
    buffer._offer("c", entry(0.3, 7))
    buffer.entries = dict(list(buffer.entries.items()))
    while len(buffer.entries) > buffer.spec.capacity:  # what admit() does after offering
        del buffer.entries[next(iter(buffer.entries))]
    assert list(buffer.entries) == ["b", "c"]  # the entry stored longest ago left first


def test_a_resumed_run_replays_what_the_run_would_have(tmp_path):
    whole = make_trainer(tmp_path / "whole", "TrainConfig.iterations = 3")
    whole.train()
    first = make_trainer(tmp_path / "split", "TrainConfig.iterations = 2")
    first.train()  # its final checkpoint holds the buffer
    assert (tmp_path / "split" / "checkpoints" / "iter_000002" / "replay.json").is_file()
    resumed = make_trainer(tmp_path / "split", "TrainConfig.iterations = 3")
    resumed.train("resume")
    assert list(resumed.replay.entries) == list(whole.replay.entries)  # the same buffer after iteration 3
    for prompt, entry in whole.replay.entries.items():
        again = resumed.replay.entries[prompt]
        assert (again.iteration, again.reward) == (entry.iteration, pytest.approx(entry.reward, rel=1e-6))
        torch.testing.assert_close(again.states, entry.states, rtol=1e-5, atol=1e-6)
    a, b = (read_metrics(tmp_path / run / "metrics.jsonl")[-1] for run in ("whole", "split"))
    for key in ("reward/shapes.preference/mean", "replay/weight_mean", "replay/fraction", "loss/policy"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize(("binding", "message"), [
    ("TrainConfig.schedule = 'fixed'", "reusing steps 0 … 4 as SDE transitions, but TrainConfig.schedule = 'fixed' "
                                       "makes steps [4] ODE steps at iteration 1"),
    ("OPGRPO.truncate_step = 8", "up to OPGRPO.truncate_step = 8, which must lie in 1 … 7"),
    ("OPGRPO.guard = True", "set OPGRPO.guard = False and OPGRPO.noise_weight = 0"),
    ("TrainConfig.shared_noise = True", "set TrainConfig.share_prefix = False"),
    ("OPGRPO.truncate_step = 0", "OPGRPO.truncate_step must be an integer >= 1, got 0"),
    ("OPGRPO.replay_weight = 'sum'", "OPGRPO.replay_weight must be 'product' or 'geometric', got 'sum'"),
])
def test_bad_replay_settings_are_refused_before_the_model_loads(tmp_path, binding, message):
    extra = [binding, "TrainConfig.backbone = 'flux'", "FluxBackbone.path = '/nonexistent/flux'",
             "FixedWindow.window_size = 4"]
    with pytest.raises(ValueError, match=re.escape(message)):
        make_trainer(tmp_path, *extra)


def test_fsdp_over_several_processes_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from mixgrpo.core.parallel import Parallel

    monkeypatch.setattr(Parallel, "num_processes", property(lambda self: 2))  # as if launched on two
    with pytest.raises(ValueError, match=re.escape("FSDP needs every process to make the same model calls: train "
                                                   "it with DDP (TrainConfig.parallelism = 'ddp'")):
        make_trainer(tmp_path, "TrainConfig.parallelism = 'fsdp'", "TrainConfig.backbone = 'flux'",
                     "FluxBackbone.path = '/nonexistent/flux'")


def test_a_buffer_larger_than_memory_is_refused_before_the_rewards_load(tmp_path):
    with pytest.raises(ValueError, match=r"OPGRPO.capacity = 1000000000000 stored trajectories of .* MiB each "
                                         r"\(τ \+ 1 = 6 latents of shape .* need .* GiB, more than half of the .* GiB "
                                         r"of memory available: set OPGRPO.capacity to at most \d+"):
        make_trainer(tmp_path, "OPGRPO.capacity = 1000000000000")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_shapes_pool_brings_prompts_back():
    pool = ShapesPrompts(pool=5)
    drawn = [pool("train", 3, seed=7, iteration=k) for k in range(8)]
    assert all(len(set(p)) == 3 for p in drawn)  # distinct within an iteration
    assert len({p for row in drawn for p in row}) == 5  # every one of the 5, again and again
    assert set(ShapesPrompts()("train", 5, seed=7)) == {p for row in drawn for p in row}  # the run's first five
    assert pool("eval", 4, seed=7) == ShapesPrompts()("eval", 4, seed=7)
    with pytest.raises(ValueError, match="ShapesPrompts.pool = 5 holds fewer prompts than the 6 an iteration draws"):
        pool("train", 6, seed=7, iteration=0)
    with pytest.raises(ValueError, match="ShapesPrompts.pool must be a positive integer"):
        ShapesPrompts(pool=0)


class TestOPGRPOContract(ObjectiveContract):
    def make_objective(self):
        return OPGRPO(weights={"geneval": 1.0})
