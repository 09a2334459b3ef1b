"""Training FLUX.2-klein: every method preset trains two iterations on the tiny snapshot (LoRA with
classifier-free guidance, full fine-tuning without), on-policy at the first minibatch, with NFE
counts that include both guidance branches; and the shipped recipe runs as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.flux2 import empirical_mu
from mixgrpo.plugins.backbones.tiny_flux2 import build_tiny_flux2

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]
STEPS, GROUP = 4, 2
SMALL = [
    f"TrainConfig.num_steps = {STEPS}", f"TrainConfig.group_size = {GROUP}", "TrainConfig.prompts_per_iteration = 2",
    "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 4", "TrainConfig.iterations = 2",
    "TrainConfig.progress = False", "TrainConfig.tensorboard = False", "TrainConfig.learning_rate = 1e-3",
    "TrainConfig.rewards = {'shapes.preference': 1.0}",
    "ProgressiveWindow.window_size = 2", "FixedWindow.window_size = 2",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/plugins/conftest.py


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    return build_tiny_flux2(tmp_path_factory.mktemp("flux2") / "base")


def backbone(flux2_dir, lora: bool) -> list[str]:
    """LoRA runs with the base model's CFG 4 (two network calls per velocity), full fine-tuning without."""
    bindings = ["TrainConfig.backbone = 'flux2'", f"Flux2Backbone.path = '{flux2_dir}'",
                "Flux2Backbone.max_sequence_length = 64"]
    return bindings + (["Flux2Backbone.lora_rank = 2", "Flux2Backbone.cfg_scale = 4.0"] if lora
                       else ["Flux2Backbone.cfg_scale = 1.0"])


def train(tmp_path: Path, gin: Path, *bindings: str) -> tuple[Trainer, list[dict], list[torch.Tensor]]:
    """Train as configured; returns the trainer, the training rows of its metrics.jsonl (not the
    evaluation's) and the trainable weights before training."""
    cfg, pm = load_config(gin, [*bindings, f"TrainConfig.output_dir = '{tmp_path / 'run'}'"])
    trainer = Trainer(cfg, pm)
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r for r in rows if "policy/ratio_mean" in r], before


@pytest.fixture(scope="module")
def runs(flux2_dir, tmp_path_factory):
    """``{(method, lora): (backbone, metrics rows)}``: every preset, LoRA + CFG and full without, 2 iterations."""
    out = {}
    for method in METHODS:
        for lora in (True, False):
            tmp = tmp_path_factory.mktemp(f"{method}_{'lora' if lora else 'full'}")
            trainer, rows, before = train(tmp, ROOT / "experiments" / "methods" / f"{method}.gin", *SMALL,
                                          *backbone(flux2_dir, lora))
            after = trainer.backbone.trainable_parameters()
            moved = sum(int((a.detach() != b).sum()) for a, b in zip(after, before, strict=True))
            out[method, lora] = (trainer.backbone, rows, moved)
    return out


@pytest.mark.parametrize("lora", [True, False], ids=["lora_cfg", "full"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_two_iterations_on_policy(runs, method, lora):
    bb, rows, moved = runs[method, lora]
    assert (bb.lora_rank > 0) == lora and bb.calls_per_velocity == (2 if lora else 1)
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert moved > 0, "training changed no trainable weight"
    if lora:
        assert all("lora_" in n for n, p in bb.module.named_parameters() if p.requires_grad)
    first = rows[0]
    # the first minibatch recomputes the rollout's own log-probs: the ratio is 1 to float rounding
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["policy/onpolicy_ratio_dev"] < 1e-6
    assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)


@pytest.mark.parametrize("method", METHODS)
def test_nfe_counts_both_guidance_branches(runs, method):
    """The same plans with and without CFG: every count doubles (the schedules depend on (k, seed) only)."""
    guided, plain = runs[method, True][1], runs[method, False][1]
    for g, p in zip(guided, plain, strict=True):
        assert g["perf/nfe_rollout"] == pytest.approx(2 * p["perf/nfe_rollout"])
        assert g["perf/nfe_train"] == pytest.approx(2 * p["perf/nfe_train"])
        assert p["perf/nfe_rollout"] > 0 and p["perf/nfe_train"] > 0


def test_nfe_matches_a_hand_count(runs):
    """MixGRPO, iteration 1: window (0, 2) of T = 4; the group's shared step 0 is one call per group, so a
    sample pays T − (1 − 1/G) rollout calls and 2 − (1 − 1/G) trained ones, each call 2 evaluations with CFG."""
    shared = 1 - 1 / GROUP
    for lora, per_call in ((True, 2), (False, 1)):
        first = runs["mixgrpo", lora][1][0]
        assert first["window/start"] == 0
        assert first["perf/nfe_rollout"] == pytest.approx(per_call * (STEPS - shared))
        assert first["perf/nfe_train"] == pytest.approx(per_call * (2 - shared))


# -- the recipe ---------------------------------------------------------------------------------------
RECIPE = ROOT / "experiments" / "mixgrpo_flux2_klein.gin"


def recipe_bindings(tmp_path: Path, flux2_dir: Path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    return [f"FLUX2_PATH = '{flux2_dir}'", f"PROMPTS_TRAIN = '{prompts}'", f"PROMPTS_TEST = '{prompts}'",
            "PICKSCORE_PATH = '/nonexistent/pickscore'"]


def test_recipe_settings_and_its_grid(flux2_dir, tmp_path):
    cfg, pm = load_config(RECIPE, recipe_bindings(tmp_path, flux2_dir))
    assert (cfg.backbone, cfg.objective, cfg.rewards) == ("flux2", "mixgrpo", {"pickscore": 1.0})
    assert (cfg.num_steps, cfg.group_size, cfg.prompts_per_iteration, cfg.num_minibatches) == (8, 16, 48, 2)
    assert (cfg.learning_rate, cfg.ema_decay, cfg.ema_interval) == (3e-4, 0.9, 8)
    bb = pm.create("backbone", cfg.backbone)  # with the recipe's backbone settings
    assert (bb.height, bb.width, bb.cfg_scale, bb.lora_rank, bb.max_sequence_length) == (384, 384, 4.0, 64, 512)
    assert bb.dtype == torch.bfloat16 and bb.model_facts().lora_alpha == 128
    # the recipe's grid is the pipeline's at its size and step count: 24×24 tokens of 16 px, 8 steps
    assert cfg.grid == "dynamic" and cfg.mu == pytest.approx(empirical_mu(24 * 24, 8), abs=1e-6)


def test_recipe_runs_as_written(flux2_dir, tmp_path):
    """The recipe with tiny sizes and a reward that needs no model: one iteration, on-policy, both branches."""
    tiny = ["Flux2Backbone.height = 32", "Flux2Backbone.width = 32", "Flux2Backbone.dtype = 'float32'",
            "Flux2Backbone.max_sequence_length = 64", "Flux2Backbone.lora_rank = 2",
            "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2", "TrainConfig.iterations = 1",
            "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 2",
            "TrainConfig.rewards = {'shapes.preference': 1.0}", "TrainConfig.progress = False",
            "TrainConfig.tensorboard = False", "TrainConfig.eval_prompts = 2", "TrainConfig.eval_seeds = 1",
            "TrainConfig.sample_prompts = 2"]
    trainer, rows, _ = train(tmp_path, RECIPE, *recipe_bindings(tmp_path, flux2_dir), *tiny)
    assert trainer.config.num_steps == 8 and trainer.backbone.calls_per_velocity == 2
    assert rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    shared = 1 - 1 / 2  # MixGRPO's first window starts at step 0, shared by each group of 2
    assert rows[0]["perf/nfe_rollout"] == pytest.approx(2 * (8 - shared))
    run = tmp_path / "run"
    assert (run / "checkpoints" / "iter_000001").is_dir() and list((run / "samples").glob("*.png"))
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in evaluations if "eval/shapes.preference/mean" in r] == [0, 1]
