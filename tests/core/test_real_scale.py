"""What a real FLUX or SD3.5 run needs from the training path, shown on tiny models of the real classes:
fp32 master weights under bf16 compute, the CFG gradient, NFE with CFG, the guards, run-seeded
randomness, the evaluation grid, the EMA and the SD3.5 recipe. Each test fails on the code before
these were fixed (see the issue notes in docs/design.md)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from mixgrpo.core import checkpoint as ckpt
from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import rollout
from mixgrpo.core.scoring import score
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.sd3 import SD3Backbone
from mixgrpo.plugins.backbones.tiny import build_tiny_flux, build_tiny_sd3

from .conftest import ROOT

PROMPTS = ["a red circle", "two blue squares on the left"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "pixel")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny")


SMALL = [
    "TrainConfig.num_steps = 4", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
    "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 4", "TrainConfig.iterations = 1",
    "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
    "TrainConfig.rewards = {'shapes.preference': 1.0}",
    "ProgressiveWindow.window_size = 2", "FixedWindow.window_size = 2",
]


def make_trainer(tmp_path, method: str, *bindings: str) -> Trainer:
    cfg, pm = load_config(ROOT / "experiments" / "methods" / f"{method}.gin",
                          [*SMALL, f"TrainConfig.output_dir = '{tmp_path / 'run'}'", *bindings])
    return Trainer(cfg, pm)


def flux(flux_dir, dtype: str) -> list[str]:
    return ["TrainConfig.backbone = 'flux'", f"FluxBackbone.path = '{flux_dir}'", f"FluxBackbone.dtype = '{dtype}'"]


def sample_and_score(trainer: Trainer, k: int = 0):
    """The iteration's rollout and advantages, as ``Trainer.iteration`` computes them."""
    c = trainer.config
    prompts, group_ids, sample_ids = trainer.local_batch(k)
    plan = trainer.schedule.plan(k, c.num_steps, c.prompts_per_iteration * c.group_size, seed=c.seed)
    traj = rollout(trainer.backbone, prompts, group_ids, sample_ids, plan, setup=trainer.setup,
                   sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver, post_solver=trainer.post_solver,
                   seed=c.seed, iteration=k, batch_size=c.rollout_batch_size)
    return traj, trainer.advantages(score(trainer.rewards, traj.images, prompts), traj)


def params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in trainer.backbone.trainable_parameters()]


# -- 1. fp32 master weights under bf16 compute -------------------------------------------------------
def test_bf16_full_finetune_keeps_fp32_master_weights_and_small_steps_land(flux_dir, tmp_path):
    """lr = 1e-6 with bf16 weights: AdamW's ~1e-6 step is below half a bf16 ulp of most weights and is
    rounded away. With fp32 master weights under bf16 autocast it lands on more than 90% of them, and
    the gradient agrees with the fp32 run's to bf16 forward precision."""
    unclipped = ["TrainConfig.learning_rate = 1e-6", "MixGRPO.clip_range = 1.0"]  # same traj, no clipping
    half = make_trainer(tmp_path / "bf16", "mixgrpo", *flux(flux_dir, "bfloat16"), *unclipped)
    full = make_trainer(tmp_path / "fp32", "mixgrpo", *flux(flux_dir, "float32"), *unclipped)
    assert {p.dtype for p in half.backbone.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in half.backbone.text_encoder.parameters()} == {torch.bfloat16}  # frozen: compute dtype
    traj, advantages = sample_and_score(full)
    before = params(half)
    half.optimize(traj, advantages, 0)
    full.optimize(traj, advantages, 0)
    after = params(half)
    changed = sum(int((a != b).sum()) for a, b in zip(after, before)) / sum(b.numel() for b in before)
    assert changed > 0.9, f"only {changed:.1%} of the trainable elements changed"
    state = half.optimizer.state[half.optimizer.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    g_half = torch.cat([p.grad.flatten() for p in half.backbone.trainable_parameters()])
    g_full = torch.cat([p.grad.flatten() for p in full.backbone.trainable_parameters()])
    assert torch.nn.functional.cosine_similarity(g_half, g_full, dim=0) > 0.99
    assert (g_half - g_full).norm() < 0.1 * g_full.norm()


def test_lora_adapters_train_in_fp32_over_a_bf16_base(flux_dir):
    from mixgrpo.plugins.backbones.flux import FluxBackbone

    bb = FluxBackbone(str(flux_dir), dtype="bfloat16", lora_rank=4)
    trainable = {p.dtype for p in bb.trainable_parameters()}
    frozen = {p.dtype for p in bb.module.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


# -- 3. the CFG gradient -----------------------------------------------------------------------------
def _grad(bb, x, sigma, cond, weight) -> torch.Tensor:
    bb.module.zero_grad(set_to_none=True)
    (bb.velocity(x, sigma, cond) * weight).sum().backward()
    return torch.cat([p.grad.flatten() for p in bb.trainable_parameters()])


def test_cfg_gradient_flows_through_the_conditional_branch_only(sd3_dir):
    s = 4.5
    bb = SD3Backbone(str(sd3_dir), cfg_scale=s, max_sequence_length=12)
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    sigma, cond = torch.tensor([0.7, 0.4]), bb.encode(PROMPTS)
    guided = _grad(bb, x, sigma, cond, weight)
    bb.cfg_scale = 1.0  # the plain network: each branch on its own
    conditional = _grad(bb, x, sigma, cond, weight)
    unconditional = _grad(bb, x, sigma, bb.negative().select([0, 0]), weight)
    torch.testing.assert_close(guided, s * conditional, rtol=1e-3, atol=2e-5)  # batch-size rounding only
    assert (unconditional.norm() > 0.1 * conditional.norm())  # the detached branch did carry a gradient
    bb.cfg_scale, bb.cfg_gradient = s, "both"
    torch.testing.assert_close(_grad(bb, x, sigma, cond, weight), s * conditional - (s - 1) * unconditional,
                               rtol=1e-3, atol=2e-5)


def test_cfg_gradient_option_is_checked(sd3_dir):
    with pytest.raises(ValueError, match="cfg_gradient"):
        SD3Backbone(str(sd3_dir), cfg_gradient="uncond", max_sequence_length=12)


# -- 4. NFE counts network evaluations ---------------------------------------------------------------
@pytest.mark.parametrize("method, per_step", [("mixgrpo", 2), ("flowgrpo", 4)])
def test_nfe_metrics_count_both_cfg_branches(sd3_dir, tmp_path, method, per_step):
    """CFG: 2 evaluations per model call; FlowGRPO's KL reference doubles the training calls again.
    MixGRPO shares the noise within a group: its first (window) step is one call per group."""
    trainer = make_trainer(tmp_path, method, "TrainConfig.backbone = 'sd3'", f"SD3Backbone.path = '{sd3_dir}'",
                           "SD3Backbone.max_sequence_length = 12", "SD3Backbone.lora_rank = 2",
                           "SD3Backbone.cfg_scale = 4.5")
    assert trainer.backbone.calls_per_velocity == 2
    metrics = trainer.iteration(0)
    c = trainer.config
    T, trained = c.num_steps, {"mixgrpo": 2, "flowgrpo": c.num_steps - 1}[method]
    assert c.num_minibatches == 1 and c.shared_noise == (method == "mixgrpo")
    saved = (1 - 1 / c.group_size) if method == "mixgrpo" else 0.0  # step 0 once per group
    assert metrics["perf/nfe_rollout"] == pytest.approx(2 * (T - saved))
    assert metrics["perf/nfe_train"] == pytest.approx(per_step * (trained - saved))


# -- 5. guards ----------------------------------------------------------------------------------------
class _Poisoned:
    """The trainer's objective (frozen, so wrapped rather than patched) with a NaN loss on the given
    calls (0-based): a stand-in for a bf16 overflow."""

    def __init__(self, objective, calls: set[int]) -> None:
        self.objective, self.calls, self.seen = objective, calls, 0

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def at_iteration(self, iteration):  # every iteration's objective is this poisoned one
        return self

    def loss(self, *args, **kwargs):
        terms, stats = self.objective.loss(*args, **kwargs)
        n, self.seen = self.seen, self.seen + 1
        return (terms * float("nan"), stats) if n in self.calls else (terms, stats)


def _poison(trainer: Trainer, calls: set[int]) -> None:
    trainer.objective = _Poisoned(trainer.objective, calls)


def test_a_non_finite_step_is_skipped_and_never_reaches_the_weights(toy_config):
    cfg, pm = toy_config("mixgrpo", "TrainConfig.num_minibatches = 2", "TrainConfig.micro_batch_size = 8")
    trainer = Trainer(cfg, pm)
    before = params(trainer)
    _poison(trainer, calls=set(range(1000)))  # every micro-batch of the iteration
    metrics = trainer.iteration(0)
    assert metrics["policy/skipped_steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(params(trainer), before))
    assert not trainer.optimizer.state, "a skipped step must not touch the optimizer state"

    trainer = Trainer(cfg, pm)
    _poison(trainer, calls={0})  # only the first minibatch
    metrics = trainer.iteration(0)
    assert metrics["policy/skipped_steps"] == 1 and math.isfinite(metrics["policy/grad_norm"])
    after = params(trainer)
    assert all(torch.isfinite(a).all() for a in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_ratio_tolerance_defaults_to_a_tenth_of_the_clip_range(toy_config, caplog):
    cfg, pm = toy_config("mixgrpo")
    trainer = Trainer(cfg, pm)
    assert trainer.ratio_tolerance == pytest.approx(trainer.objective.clip_range / 10)
    traj, advantages = sample_and_score(trainer)
    traj.log_prob += 3e-5  # a systematic mismatch smaller than the old 1e-3 tolerance
    with caplog.at_level(logging.WARNING, logger="mixgrpo.core.steps"):
        metrics = trainer.optimize(traj, advantages, 0)
    assert metrics["policy/onpolicy_ratio_dev"] == pytest.approx(3e-5, rel=0.05)
    assert any("on-policy ratio deviates" in r.getMessage() for r in caplog.records)


def test_num_minibatches_must_divide_each_process_samples(toy_config):
    cfg, pm = toy_config("mixgrpo", "TrainConfig.num_minibatches = 4")  # 2 prompts x 3 = 6 samples
    with pytest.raises(ValueError, match="num_minibatches=4 must divide the 6 samples"):
        Trainer(cfg, pm)


def test_kl_reference_is_the_base_model_after_resume(toy_config, tmp_path):
    """FlowGRPO's KL reference of a full fine-tune stays the base weights when a run resumes."""
    kl = "FlowGRPO.kl_beta = 0.04"
    straight_cfg, pm = toy_config("flowgrpo", kl, "TrainConfig.iterations = 2",
                                  f"TrainConfig.output_dir = '{tmp_path}/a'")
    straight = Trainer(straight_cfg, pm)
    base = params(straight)
    straight.train()
    first_cfg, pm = toy_config("flowgrpo", kl, "TrainConfig.iterations = 1", "TrainConfig.checkpoint_every = 1",
                               f"TrainConfig.output_dir = '{tmp_path}/b'")
    Trainer(first_cfg, pm).train()
    second_cfg, pm = toy_config("flowgrpo", kl, "TrainConfig.iterations = 2",
                                f"TrainConfig.output_dir = '{tmp_path}/b'")
    resumed = Trainer(second_cfg, pm)
    resumed.train("resume")
    reference = [p.detach() for p in resumed.backbone._reference_module.parameters()]
    assert all(torch.equal(r, b) for r, b in zip(reference, base))
    for a, b in zip(params(straight), params(resumed)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# -- 6. randomness tied to the run ---------------------------------------------------------------------
def test_run_seed_draws_the_random_subsets(toy_config):
    drawn = {}

    class Recorded:  # the trainer's schedule (frozen, so wrapped rather than patched), recording its first plan
        def __init__(self, schedule, seed):
            self.schedule, self.seed = schedule, seed

        def plan(self, *args, **kwargs):
            return drawn.setdefault(self.seed, self.schedule.plan(*args, **kwargs))

    for seed in (0, 1):
        cfg, pm = toy_config("dancegrpo", f"TrainConfig.seed = {seed}")
        trainer = Trainer(cfg, pm)
        trainer.schedule = Recorded(trainer.schedule, seed)
        trainer.iteration(0)
    assert drawn[0].train_steps != drawn[1].train_steps


def test_training_prompts_are_drawn_without_replacement(toy_config, tmp_path):
    lines = [f"prompt number {n}" for n in range(10)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("held out\n")
    files = ["TrainConfig.prompt_set = 'file'", f"FilePrompts.train_path = '{tmp_path / 'train.txt'}'",
             f"FilePrompts.eval_path = '{tmp_path / 'test.txt'}'", "TrainConfig.prompts_per_iteration = 5",
             "TrainConfig.group_size = 2"]
    streams = {}
    for seed in (0, 1):
        cfg, pm = toy_config("mixgrpo", *files, f"TrainConfig.seed = {seed}")
        trainer = Trainer(cfg, pm)
        stream = []
        for k in range(4):
            prompts, group_ids, _ = trainer.local_batch(k)
            stream += [prompts[list(group_ids).index(g)] for g in sorted(set(group_ids.tolist()))]
        streams[seed] = stream
        for epoch in (stream[:10], stream[10:]):
            assert sorted(epoch) == sorted(lines)  # every prompt once per epoch
    assert streams[0] != streams[1] and streams[0][:10] != streams[0][10:]


# -- 7. evaluation on its own grid ---------------------------------------------------------------------
def test_evaluation_uses_its_own_number_of_steps(toy_config):
    cfg, pm = toy_config("mixgrpo", "TrainConfig.eval_num_steps = 6", "TrainConfig.eval_prompts = 3",
                         "TrainConfig.eval_seeds = 1")
    trainer = Trainer(cfg, pm)
    sigmas = []
    velocity = trainer.backbone.velocity
    trainer.backbone.velocity = lambda x, s, c: sigmas.append(float(s[0])) or velocity(x, s, c)
    trainer.evaluate()
    from mixgrpo.core.sigmas import sigma_grid

    assert sigmas == pytest.approx(sigma_grid(6, cfg.shift)[:-1].tolist())
    assert trainer.setup.num_steps == 8  # training keeps its grid


# -- EMA (FlowGRPO's evaluation weights) -----------------------------------------------------------------
def test_ema_follows_the_warm_up_recursion_is_evaluated_and_resumes(toy_config, tmp_path):
    ema = ["TrainConfig.ema_decay = 0.9", "TrainConfig.ema_interval = 2", "TrainConfig.num_minibatches = 3",
           "TrainConfig.checkpoint_every = 1", "TrainConfig.eval_prompts = 2", "TrainConfig.eval_seeds = 1",
           f"TrainConfig.output_dir = '{tmp_path}/run'"]
    cfg, pm = toy_config("mixgrpo", *ema)
    trainer = Trainer(cfg, pm)
    expected = params(trainer)
    after_steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (step(*a, **k), after_steps.append(params(trainer)))[0]
    trainer.train()
    assert len(after_steps) == 3 and trainer.ema.num_steps == 3
    for n, weights in enumerate(after_steps):  # float64 re-derivation of the average
        if (n + 1) % 2 == 0:
            d = min((1 + n) / (10 + n), 0.9)
            expected = [e.double() * d + w.double() * (1 - d) for e, w in zip(expected, weights)]
    for avg, ref in zip(trainer.ema.shadow, expected):
        torch.testing.assert_close(avg.double(), ref, atol=1e-6, rtol=1e-6)
    live = params(trainer)
    with trainer.evaluation_weights():
        assert all(torch.equal(p, a) for p, a in zip(params(trainer), trainer.ema.shadow))
        scores_ema = trainer.evaluate()
    assert all(torch.equal(p, a) for p, a in zip(params(trainer), live))  # swapped back bit for bit
    assert scores_ema != trainer.evaluate()
    restored = Trainer(cfg, pm)
    ckpt.resume(restored, tmp_path / "run" / "checkpoints")
    assert restored.ema.num_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(restored.ema.shadow, trainer.ema.shadow))


# -- 8. the SD3.5 recipe ---------------------------------------------------------------------------------
def test_sd3_recipe_is_flowgrpos(sd3_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    cfg, pm = load_config(ROOT / "experiments" / "flowgrpo_sd3.gin",
                         [f"SD3_PATH = '{sd3_dir}'", f"PROMPTS_TRAIN = '{prompts}'", f"PROMPTS_TEST = '{prompts}'",
                          "PICKSCORE_PATH = '/nonexistent/pickscore'"])  # nothing loads the reward here
    assert cfg.rewards == {"pickscore": 1.0}
    assert (cfg.num_steps, cfg.eval_num_steps, cfg.num_minibatches) == (10, 40, 2)
    assert (cfg.ema_decay, cfg.ema_interval, cfg.group_size, cfg.prompts_per_iteration) == (0.9, 8, 24, 48)
    bb = pm.create("backbone", cfg.backbone)  # with the recipe's backbone settings
    assert (bb.max_sequence_length, bb.cfg_scale, bb.cfg_gradient, bb.lora_rank) == (128, 4.5, "conditional", 32)
    assert {p.dtype for p in bb.vae.parameters()} == {torch.float32} and bb.dtype == torch.bfloat16


def test_sd3_decodes_in_fp32_when_asked(sd3_dir):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    fp32 = SD3Backbone(str(sd3_dir), max_sequence_length=12)
    mixed = SD3Backbone(str(sd3_dir), dtype="bfloat16", vae_dtype="float32", max_sequence_length=12)
    torch.testing.assert_close(mixed.decode(latents), fp32.decode(latents), atol=0, rtol=0)
