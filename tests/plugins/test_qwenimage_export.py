"""The Qwen-Image recipe runs as written, and ``mixgrpo export`` writes what diffusers' own
``QwenImagePipeline`` loads (``load_lora_weights``; a transformer folder) and draws what the trained
backbone draws from the same noise and σ grid."""

from __future__ import annotations

import pytest
import torch

from mixgrpo.commands.cli import main
from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.qwenimage import image_seq_mu
from mixgrpo.plugins.backbones.tiny_qwenimage import build_tiny_qwenimage
from mixgrpo.plugins.samplers.euler import Euler
from tests.export_checks import exported_lora_keys, max_diff
from tests.plugins.test_qwenimage_training import LORA, PROMPTS, ROOT, SIZE, STEPS, TOL, train


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwenimage(tmp_path_factory.mktemp("qwenimage") / "tiny")


# -- the recipe ------------------------------------------------------------------------------------------
def test_the_recipe_runs_as_written(tmp_path, qwen_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    recipe = [f"QWENIMAGE_PATH = '{qwen_dir}'", f"PROMPTS_TRAIN = '{prompts}'", f"PROMPTS_TEST = '{prompts}'",
              "PICKSCORE_PATH = '/nonexistent/pickscore'"]  # the run below swaps the reward: nothing loads it
    cfg, pm = load_config(ROOT / "experiments" / "flowgrpo_qwenimage.gin", recipe)
    assert (cfg.num_steps, cfg.eval_num_steps, cfg.group_size, cfg.prompts_per_iteration) == (10, 50, 16, 32)
    assert (cfg.schedule, cfg.grid, cfg.num_minibatches, cfg.rewards) == ("fast", "dynamic", 2, {"pickscore": 1.0})
    bb = pm.create("backbone", cfg.backbone)
    assert (bb.height, bb.cfg_scale, bb.negative_prompt, bb.lora_rank, bb.dtype) == (512, 4.0, " ", 32, torch.bfloat16)
    # the recipe's mu is the pipeline's at 512x512 for the real VAE (downsampling 8: 32x32 = 1024 tokens;
    # the tiny VAE downsamples by 2), from the scheduler config the snapshot ships
    assert cfg.mu == pytest.approx(image_seq_mu((512 // 16) ** 2, bb.scheduler_config), abs=1e-5)
    # as written, shrunk to run here: tiny sizes, a reward that needs no model, two iterations
    small = ["QwenImageBackbone.height = 32", "QwenImageBackbone.width = 32", "QwenImageBackbone.dtype = 'float32'",
             "QwenImageBackbone.max_sequence_length = 16", "QwenImageBackbone.lora_rank = 2",
             "TrainConfig.num_steps = 4", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
             "TrainConfig.iterations = 2", "TrainConfig.rewards = {'shapes.preference': 1.0}",
             "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
             f"TrainConfig.output_dir = '{tmp_path / 'run'}'"]
    cfg, pm = load_config(ROOT / "experiments" / "flowgrpo_qwenimage.gin", [*recipe, *small])
    history = Trainer(cfg, pm).train()
    # two minibatches of 2 against rollout chunks of 4: fp32 rounding of other batch shapes (2e-6
    # measured), inside the trainer's own on-policy tolerance (a tenth of the clip range 1e-4)
    assert len(history) == 2 and history[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)


# -- exports load into the pipeline ----------------------------------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def ours(bb) -> torch.Tensor:
    return sample_ode(bb, PROMPTS, [0, 0], setup=SamplingSetup(num_steps=STEPS, grid="dynamic", mu=bb.mu()),
                      solver=Euler())


def pipeline_images(pipe, bb) -> torch.Tensor:
    """The pipeline's images from the noise ``ours`` draws, with its own grid (shift_terminal off)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    pipe.set_progress_bar_config(disable=True)
    x = torch.stack([keyed_normal(bb.latent_shape(), 0, "eval", n) for n in range(len(PROMPTS))])
    c, h, w = bb.latent_shape()
    with torch.no_grad():
        return pipe(PROMPTS, negative_prompt=" ", true_cfg_scale=bb.cfg_scale, height=SIZE, width=SIZE,
                    num_inference_steps=STEPS, latents=QwenImagePipeline._pack_latents(x, len(PROMPTS), c, h, w),
                    max_sequence_length=16, output_type="pt").images


def test_lora_export_loads_with_load_lora_weights(tmp_path, capsys, qwen_dir):
    from diffusers import QwenImagePipeline

    trainer, _ = train(tmp_path / "run", "mixgrpo", qwen_dir, True, "TrainConfig.iterations = 1",
                       "TrainConfig.checkpoint_every = 1")
    rc, out, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "lora")
    assert rc == 0, err
    assert "load_lora_weights" in out
    keys = exported_lora_keys(tmp_path / "lora", trainer.backbone, LORA["alpha"])  # diffusers' key format
    assert all(k.startswith("transformer.transformer_blocks.") for k in keys)
    pipe = QwenImagePipeline.from_pretrained(qwen_dir, local_files_only=True)
    base = pipeline_images(pipe, trainer.backbone)
    pipe.load_lora_weights(tmp_path / "lora")  # diffusers' own loader
    exported, trained = pipeline_images(pipe, trainer.backbone), ours(trainer.backbone)
    assert max_diff(exported, trained) < TOL, max_diff(exported, trained)
    assert max_diff(base, trained) > 50 * TOL, max_diff(base, trained)


def test_full_export_is_a_transformer_folder(tmp_path, capsys, qwen_dir):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    trainer, _ = train(tmp_path / "run", "mixgrpo", qwen_dir, False, "TrainConfig.iterations = 1",
                       "TrainConfig.checkpoint_every = 1")
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "full")
    assert rc == 0, err
    assert (tmp_path / "full" / "config.json").is_file()
    transformer = QwenImageTransformer2DModel.from_pretrained(tmp_path / "full")
    exported = pipeline_images(QwenImagePipeline.from_pretrained(qwen_dir, transformer=transformer), trainer.backbone)
    base = pipeline_images(QwenImagePipeline.from_pretrained(qwen_dir), trainer.backbone)
    trained = ours(trainer.backbone)
    assert max_diff(exported, trained) < TOL, max_diff(exported, trained)
    assert max_diff(base, trained) > 50 * TOL, max_diff(base, trained)
