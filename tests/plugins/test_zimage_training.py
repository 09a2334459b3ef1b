"""Every method preset trains the tiny Z-Image snapshot for 2 iterations with LoRA (full fine-tuning:
``test_zimage_training_full.py``), with guidance on: the first minibatch is on-policy (ratio 1) and
the rollout's NFE counts both guidance branches, checked against a count by hand from the σ grid
and the plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.tiny_zimage import build_tiny_zimage

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]
SMALL = [
    "TrainConfig.num_steps = 4", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
    "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 4", "TrainConfig.iterations = 2",
    "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
    "TrainConfig.rewards = {'shapes.preference': 1.0}",
    "ProgressiveWindow.window_size = 2", "FixedWindow.window_size = 2",
]


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    return build_tiny_zimage(tmp_path_factory.mktemp("zimage") / "tiny")


def zimage(path: Path, lora: bool) -> list[str]:
    bindings = ["TrainConfig.backbone = 'zimage'", f"ZImageBackbone.path = '{path}'",
                "ZImageBackbone.max_sequence_length = 32", "ZImageBackbone.guidance_scale = 4.0"]
    if lora:
        return [*bindings, "ZImageBackbone.lora_rank = 2", "TrainConfig.learning_rate = 1e-2"]
    return [*bindings, "TrainConfig.learning_rate = 1e-4"]


def rollout_nfe_by_hand(trainer: Trainer, k: int) -> float:
    """Network evaluations per sample of iteration ``k``: one per step of its σ grid, except that with
    shared noise the steps up to the first SDE step are paid once per group; ×2 for guidance."""
    c = trainer.config
    samples = c.prompts_per_iteration * c.group_size
    plan = trainer.plan(k, torch.arange(samples))
    steps = trainer.setup.sigmas(plan).numel() - 1
    shared = (min(plan.sde_steps) + 1) * (1 - c.prompts_per_iteration / samples) if c.shared_noise else 0.0
    return 2 * (steps - shared)


def train_two_iterations(tmp_path: Path, method: str, bindings: list[str], lora: bool) -> None:
    """Train ``method`` for 2 iterations on the guided backbone ``bindings`` select, and check the
    first ratio, the NFE counts and the weights."""
    config, pm = load_config(ROOT / "experiments" / "methods" / f"{method}.gin",
                             [*SMALL, *bindings, f"TrainConfig.output_dir = '{tmp_path / 'run'}'"])
    trainer = Trainer(config, pm)
    assert trainer.backbone.calls_per_velocity == 2 and (trainer.backbone.lora_rank > 0) == lora
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    history = trainer.train()
    assert [row["iteration"] for row in history] == [1, 2]
    first = history[0]
    assert abs(first["policy/ratio_mean"] - 1) < 1e-5, first["policy/ratio_mean"]  # on-policy at the first minibatch
    assert first["policy/onpolicy_ratio_dev"] < 1e-5
    for k, row in enumerate(history):
        assert row["perf/nfe_rollout"] == pytest.approx(rollout_nfe_by_hand(trainer, k)), (k, row["perf/nfe_rollout"])
        assert row["perf/nfe_train"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in row.values())
    after = trainer.backbone.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), "training changed no weight"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "iter_000002"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_two_iterations_with_lora(zimage_dir, tmp_path, method):
    train_two_iterations(tmp_path, method, zimage(zimage_dir, lora=True), lora=True)
