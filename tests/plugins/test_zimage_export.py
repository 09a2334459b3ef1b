"""Z-Image runs end to end: the recipe ``experiments/flowgrpo_zimage.gin`` trains as written (paths bound
to tiny local models), and ``mixgrpo export`` writes what diffusers loads: the LoRA through
``ZImagePipeline.load_lora_weights``, the full weights as a ``ZImageTransformer2DModel`` folder; the
pipeline then samples what the trained backbone samples, from the same noise on its own grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.tiny_zimage import build_tiny_zimage
from mixgrpo.plugins.backbones.zimage import scheduler_shift
from mixgrpo.plugins.samplers.euler import Euler
from tests.export_checks import export, exported_lora_keys, max_diff

from .reward_refs import make_tiny_clip

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares on the left"]
STEPS = 4
TINY = [
    f"TrainConfig.num_steps = {STEPS}", "TrainConfig.shift = 3.0", "TrainConfig.group_size = 2",
    "TrainConfig.prompts_per_iteration = 2", "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 4",
    "TrainConfig.iterations = 1", "TrainConfig.checkpoint_every = 1", "TrainConfig.progress = False",
    "TrainConfig.tensorboard = False", "TrainConfig.rewards = {'shapes.preference': 1.0}",
    "ProgressiveWindow.window_size = 2",
]
LORA = {"rank": 4, "alpha": 6}  # alpha / rank = 1.5: an adapter loaded with the wrong scale would show
TOL = 2e-5  # float32 rounding


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    return build_tiny_zimage(tmp_path_factory.mktemp("zimage") / "Z-Image")


# -- the recipe --------------------------------------------------------------------------------------
def test_the_recipe_trains_as_written(zimage_dir, tmp_path):
    (tmp_path / "train.txt").write_text("a red circle\ntwo blue squares\na green star\n")
    (tmp_path / "test.txt").write_text("a red circle\n")
    paths = [f"ZIMAGE_PATH = '{zimage_dir}'", f"PROMPTS_TRAIN = '{tmp_path / 'train.txt'}'",
             f"PROMPTS_TEST = '{tmp_path / 'test.txt'}'",
             f"PICKSCORE_PATH = '{make_tiny_clip(tmp_path / 'pickscore', seed=6)}'"]
    recipe = ROOT / "experiments" / "flowgrpo_zimage.gin"
    config, pm = load_config(recipe, paths)
    assert (config.num_steps, config.shift, config.group_size, config.prompts_per_iteration) == (10, 6.0, 16, 48)
    assert (config.num_minibatches, config.eval_num_steps, config.ema_decay, config.ema_interval) == (2, 40, 0.9, 8)
    assert config.rewards == {"pickscore": 1.0} and config.learning_rate == 3e-4
    sizes = ["TrainConfig.iterations = 2", "TrainConfig.num_steps = 4", "TrainConfig.prompts_per_iteration = 2",
             "TrainConfig.group_size = 2", "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 2",
             "TrainConfig.num_minibatches = 1", "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
             f"TrainConfig.output_dir = '{tmp_path / 'run'}'", "ZImageBackbone.height = 32",
             "ZImageBackbone.width = 32", "ZImageBackbone.max_sequence_length = 32", "ZImageBackbone.lora_rank = 4",
             "ZImageBackbone.lora_alpha = 8"]
    trainer = Trainer(*load_config(recipe, [*paths, *sizes]))
    bb = trainer.backbone
    assert (bb.model_facts().guidance, bb.cfg_gradient, bb.dtype) == (4.0, "conditional", torch.bfloat16)
    assert trainer.objective.kl_beta == 0.0 and trainer.objective.std == "group"
    rows = trainer.train()
    assert [r["iteration"] for r in rows] == [1, 2]
    assert abs(rows[0]["policy/ratio_mean"] - 1) < 1e-5  # bf16 compute: rollout and training round alike
    for r in rows:
        assert r["reward/pickscore/failed"] == 0 and r["perf/nfe_rollout"] == 2 * STEPS  # CFG: both branches
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_000002"


# -- exports -----------------------------------------------------------------------------------------
def train_run(out: Path, root: Path, lora: bool) -> Trainer:
    """One MixGRPO iteration with guidance 4 into the run directory ``out``."""
    bindings = ["TrainConfig.backbone = 'zimage'", f"ZImageBackbone.path = '{root}'",
                "ZImageBackbone.max_sequence_length = 32", "ZImageBackbone.guidance_scale = 4.0"]
    if lora:
        bindings += [f"ZImageBackbone.lora_rank = {LORA['rank']}", f"ZImageBackbone.lora_alpha = {LORA['alpha']}",
                     "TrainConfig.learning_rate = 3e-2"]
    else:
        bindings += ["TrainConfig.learning_rate = 1e-3"]
    config, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin",
                             [*TINY, *bindings, f"TrainConfig.output_dir = '{out}'"])
    trainer = Trainer(config, pm)
    trainer.train()
    trainer.backbone.module.eval()
    return trainer


def ours(backbone, root: Path) -> torch.Tensor:
    return sample_ode(backbone, PROMPTS, [0] * len(PROMPTS),
                      setup=SamplingSetup(num_steps=STEPS, shift=scheduler_shift(root)), solver=Euler())


def pipeline_images(pipe, backbone) -> torch.Tensor:
    """ZImagePipeline's images from the backbone's noise, on the pipeline's own grid and guidance."""
    x = torch.stack([keyed_normal(backbone.latent_shape(), 0, "eval", n) for n in range(len(PROMPTS))])
    with torch.no_grad():
        return pipe(list(PROMPTS), height=backbone.height, width=backbone.width, num_inference_steps=STEPS,
                    latents=x, guidance_scale=backbone.model_facts().guidance,
                    max_sequence_length=backbone.max_sequence_length, output_type="pt").images


def load_pipeline(root: Path, transformer=None):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(root, **({"transformer": transformer} if transformer else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lora_export_loads_into_zimage_pipeline(tmp_path, capsys, zimage_dir):
    trainer = train_run(tmp_path / "run", zimage_dir, lora=True)
    printed = export(capsys, tmp_path / "run", tmp_path / "lora")
    assert "ZImagePipeline" in printed and "load_lora_weights" in printed
    exported_lora_keys(tmp_path / "lora", trainer.backbone, LORA["alpha"])  # diffusers' key format

    snippet = "\n".join(trainer.backbone.load_snippet("exported", PROMPTS[0], 8))  # the model card's
    assert "ZImagePipeline.from_pretrained" in snippet and "guidance_scale=4.0" in snippet

    pipe = load_pipeline(zimage_dir)
    base = pipeline_images(pipe, trainer.backbone)
    pipe.load_lora_weights(tmp_path / "lora")  # diffusers' own loader
    exported = pipeline_images(pipe, trainer.backbone)
    trained = ours(trainer.backbone, zimage_dir)
    assert max_diff(exported, trained) < TOL, max_diff(exported, trained)
    assert max_diff(base, trained) > 50 * TOL, max_diff(base, trained)  # a lost or wrong alpha would fail


def test_full_export_is_a_transformer_folder(tmp_path, capsys, zimage_dir):
    from diffusers import ZImageTransformer2DModel

    trainer = train_run(tmp_path / "run", zimage_dir, lora=False)
    export(capsys, tmp_path / "run", tmp_path / "full", "--max-shard-size", "300KB")
    files = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert "config.json" in files and "diffusion_pytorch_model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1 and not any(f.endswith(".bin") for f in files)

    exported = pipeline_images(load_pipeline(zimage_dir, ZImageTransformer2DModel.from_pretrained(tmp_path / "full")),
                               trainer.backbone)
    base = pipeline_images(load_pipeline(zimage_dir), trainer.backbone)
    trained = ours(trainer.backbone, zimage_dir)
    assert max_diff(exported, trained) < TOL, max_diff(exported, trained)
    assert max_diff(base, trained) > 50 * TOL, max_diff(base, trained)
