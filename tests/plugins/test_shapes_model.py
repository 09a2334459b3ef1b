"""The shipped shapes-world base model: loaded through the flux plugin, imperfect but competent,
and trained for 2 iterations by every method preset."""

import json
from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config, parse_gin
from mixgrpo.core.plugins import get_plugin_manager
from mixgrpo.core.rollout import SamplingSetup, sample_ode
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones import ASSETS, resolve_model_path
from mixgrpo.plugins.backbones.flux import FluxBackbone
from mixgrpo.plugins.rewards.shapes import CompositionReward
from mixgrpo.plugins.samplers.euler import Euler
from mixgrpo.plugins.world.pretrain import REPORT_FILE
from mixgrpo.plugins.world.shapes import sample_prompts

ROOT = Path(__file__).resolve().parents[2]
WORLD = ROOT / "experiments" / "shapes" / "world.gin"
METHODS = ["flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]
SMALL = ["TrainConfig.num_steps = 6", "TrainConfig.group_size = 3", "TrainConfig.prompts_per_iteration = 2",
         "TrainConfig.iterations = 2", "TrainConfig.eval_every = 0", "TrainConfig.sample_every = 0",
         "TrainConfig.progress = False", "TrainConfig.tensorboard = False", "ProgressiveWindow.window_size = 2",
         "ProgressiveWindow.shift_interval = 1", "FixedWindow.window_size = 2"]


@pytest.fixture(scope="module")
def backbone():
    parse_gin([WORLD])  # the world's binding of FluxBackbone.path = 'shipped:shapes-flux'
    return get_plugin_manager().create("backbone", "flux")


def test_shipped_model_is_in_the_package_and_loads_through_the_flux_plugin(backbone):
    folder = resolve_model_path("shipped:shapes-flux")
    assert folder == ASSETS / "shapes-flux"
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert isinstance(backbone, FluxBackbone) and backbone.path == folder
    assert backbone.latent_shape() == (3, 32, 32) and backbone.vae is None
    assert type(backbone.module).__name__ == "FluxTransformer2DModel"
    assert sum(p.numel() for p in backbone.module.parameters()) < 5_000_000
    with pytest.raises(FileNotFoundError, match="shipped models: shapes-flux"):
        resolve_model_path("shipped:nope")


def test_base_model_is_competent_but_leaves_room_for_rl(backbone):
    prompts = sample_prompts("eval", 48, seed=3)
    images = sample_ode(backbone, prompts, [3] * len(prompts), setup=SamplingSetup(num_steps=10, shift=3.0),
                        solver=Euler(), batch_size=48)
    reward = CompositionReward()
    scores = reward(images, prompts)
    noise = reward(torch.rand_like(images), prompts)
    assert scores.mean() > noise.mean() + 0.2  # it draws the shapes it is asked for, often
    assert scores.mean() < 0.95  # but not perfectly: RL has room
    report = json.loads((ASSETS / "shapes-flux" / REPORT_FILE).read_text())
    assert 0.2 < report["heldout_cfg1"]["composition/mean"] < 0.95


@pytest.mark.parametrize("method", METHODS)
def test_two_iterations_of_every_method_on_the_shipped_model(method, tmp_path):
    cfg, pm = load_config(ROOT / "experiments" / "methods" / f"{method}.gin",
                          [f"include '{WORLD}'", *SMALL, f"TrainConfig.output_dir = '{tmp_path}'"])
    trainer = Trainer(cfg, pm)
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    history = trainer.train()
    assert [row["iteration"] for row in history] == [1, 2]
    for row in history:
        assert abs(row["policy/onpolicy_ratio_dev"]) < 1e-4
        assert 0 <= row["reward/shapes.composition/mean"] <= 1
    after = trainer.backbone.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
