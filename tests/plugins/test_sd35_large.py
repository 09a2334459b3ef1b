"""Stable Diffusion 3.5 Large through the ``sd3`` backbone, on a tiny snapshot of Large's shape (no
dual-attention blocks, RMS q/k norm): sampling equals ``StableDiffusion3Pipeline``'s with and without
guidance, every method preset trains it with LoRA, and its recipe runs as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.sd3 import SD3Backbone
from mixgrpo.plugins.backbones.tiny_zimage import build_tiny_sd35_large
from mixgrpo.plugins.samplers.euler import Euler

from .reward_refs import make_tiny_clip
from .test_zimage_training import METHODS, train_two_iterations

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares on the left"]
STEPS = 4
LENGTH = 12  # T5 tokens
TOL = 2e-5  # float32 rounding


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory):
    return build_tiny_sd35_large(tmp_path_factory.mktemp("sd35l") / "stable-diffusion-3.5-large")


@pytest.fixture(scope="module")
def pipe(large_dir):
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(large_dir)  # the snapshot's scheduler (shift 3)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_the_snapshot_has_large_s_shape(large_dir):
    bb = SD3Backbone(str(large_dir), max_sequence_length=LENGTH)
    blocks = bb.unwrapped().transformer_blocks
    cfg = bb.config
    assert tuple(cfg.dual_attention_layers) == () and cfg.qk_norm == "rms_norm"
    assert all(b.attn2 is None for b in blocks)  # MMDiT, not MMDiT-X (SD3.5 Medium's dual attention)
    assert cfg.caption_projection_dim == cfg.num_attention_heads * cfg.attention_head_dim
    assert (large_dir / "model_index.json").is_file() and (bb.height, bb.width) == (32, 32)  # sample_size × 2


@pytest.mark.parametrize("guidance", [1.0, 3.5], ids=["no guidance", "guidance 3.5"])
def test_euler_sampling_equals_the_pipeline(large_dir, pipe, guidance):
    """StableDiffusion3Pipeline's default grid is the scheduler's own (σ_min shifted twice): the
    ``diffusers`` grid kind with the snapshot's shift."""
    bb = SD3Backbone(str(large_dir), cfg_scale=guidance, max_sequence_length=LENGTH)
    ours = sample_ode(bb, PROMPTS, [0, 0], setup=SamplingSetup(num_steps=STEPS, shift=3.0, grid="diffusers"),
                      solver=Euler())
    x = torch.stack([keyed_normal(bb.latent_shape(), 0, "eval", n) for n in range(len(PROMPTS))])
    theirs = pipe(list(PROMPTS), height=bb.height, width=bb.width, num_inference_steps=STEPS, latents=x,
                  guidance_scale=guidance, max_sequence_length=LENGTH, output_type="pt").images
    diff = float((ours - theirs).abs().max())
    assert ours.shape == theirs.shape == (2, 3, 32, 32) and diff < TOL, diff
    if guidance > 1:
        plain = SD3Backbone(str(large_dir), cfg_scale=1.0, max_sequence_length=LENGTH)
        unguided = sample_ode(plain, PROMPTS, [0, 0], setup=SamplingSetup(num_steps=STEPS, shift=3.0, grid="diffusers"),
                              solver=Euler())
        assert float((ours - unguided).abs().max()) > 100 * TOL


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_two_iterations_with_lora(large_dir, tmp_path, method):
    bindings = ["TrainConfig.backbone = 'sd3'", f"SD3Backbone.path = '{large_dir}'",
                f"SD3Backbone.max_sequence_length = {LENGTH}", "SD3Backbone.cfg_scale = 3.5",
                "SD3Backbone.lora_rank = 2", "TrainConfig.learning_rate = 1e-2"]
    train_two_iterations(tmp_path, method, bindings, lora=True)


def test_the_recipe_trains_as_written(large_dir, tmp_path):
    (tmp_path / "train.txt").write_text("a red circle\ntwo blue squares\n")
    (tmp_path / "test.txt").write_text("a red circle\n")
    recipe = ROOT / "experiments" / "flowgrpo_sd35_large.gin"
    paths = [f"SD35_LARGE_PATH = '{large_dir}'", f"PROMPTS_TRAIN = '{tmp_path / 'train.txt'}'",
             f"PROMPTS_TEST = '{tmp_path / 'test.txt'}'",
             f"PICKSCORE_PATH = '{make_tiny_clip(tmp_path / 'pickscore', seed=6)}'"]
    config, _ = load_config(recipe, paths)
    assert (config.num_steps, config.eval_num_steps) == (10, 28)
    assert (config.group_size, config.prompts_per_iteration, config.num_minibatches) == (24, 48, 2)
    sizes = ["TrainConfig.iterations = 1", "TrainConfig.num_steps = 3", "TrainConfig.prompts_per_iteration = 1",
             "TrainConfig.group_size = 2", "TrainConfig.rollout_batch_size = 2", "TrainConfig.micro_batch_size = 2",
             "TrainConfig.num_minibatches = 1", "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
             f"TrainConfig.output_dir = '{tmp_path / 'run'}'", "SD3Backbone.height = 32", "SD3Backbone.width = 32",
             f"SD3Backbone.max_sequence_length = {LENGTH}", "SD3Backbone.lora_rank = 4", "SD3Backbone.lora_alpha = 8"]
    trainer = Trainer(*load_config(recipe, [*paths, *sizes]))
    bb = trainer.backbone
    assert (bb.cfg_scale, bb.cfg_gradient, bb.dtype, trainer.objective.kl_beta) == (3.5, "conditional", torch.bfloat16,
                                                                                     0.01)
    assert {p.dtype for p in bb.vae.parameters()} == {torch.float32}
    [row] = trainer.train()
    assert row["reward/pickscore/failed"] == 0 and row["perf/nfe_rollout"] == 2 * 3  # CFG: both branches
