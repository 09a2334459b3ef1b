"""Training on the tiny Qwen-Image snapshot: every method preset trains two iterations with LoRA
(full fine-tuning: test_qwenimage_full.py; the recipe and exports: test_qwenimage_export.py), on-policy
at the first minibatch, with rollout NFE counted by hand (true CFG: two network evaluations a call)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.tiny_qwenimage import build_tiny_qwenimage

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares on the left"]
STEPS, SIZE = 4, 32
SMALL = [
    f"TrainConfig.num_steps = {STEPS}", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
    "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 4", "TrainConfig.progress = False",
    "TrainConfig.tensorboard = False", "TrainConfig.rewards = {'shapes.preference': 1.0}",
    "ProgressiveWindow.window_size = 2", "FixedWindow.window_size = 2",
]
# Network evaluations per rollout sample, counted by hand on T = 4 steps, groups of G = 2, a window of
# 2 steps at step 0, and true CFG (2 evaluations per model call):
#  flowgrpo: 4 calls, no shared noise                                      -> 2·4 = 8
#  dancegrpo, mixgrpo: shared noise, step 0 paid once per group (1 − 1/G) -> 2·(4 − ½) = 7
#  mixgrpo_flash(_star): window (0, 2) then n_post = max(int(2·r), 2) = 2 points: σ0 σ1 σ2 0, 3 calls,
#                        step 0 once per group                            -> 2·(3 − ½) = 5
ROLLOUT_NFE = {"flowgrpo": 8.0, "dancegrpo": 7.0, "mixgrpo": 7.0, "mixgrpo_flash": 5.0, "mixgrpo_flash_star": 5.0}
LORA = {"rank": 4, "alpha": 6}  # alpha / rank = 1.5: an adapter loaded with the wrong scale would show
TOL = 2e-5


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwenimage(tmp_path_factory.mktemp("qwenimage") / "tiny")


def bindings(root: Path, lora: bool) -> list[str]:
    out = ["TrainConfig.backbone = 'qwenimage'", f"QwenImageBackbone.path = '{root}'",
           f"QwenImageBackbone.height = {SIZE}", f"QwenImageBackbone.width = {SIZE}",
           "QwenImageBackbone.max_sequence_length = 16"]  # true CFG 4 against " ", the defaults
    if lora:
        return [*out, f"QwenImageBackbone.lora_rank = {LORA['rank']}",
                f"QwenImageBackbone.lora_alpha = {LORA['alpha']}", "TrainConfig.learning_rate = 3e-2"]
    return [*out, "TrainConfig.learning_rate = 1e-3"]


def train(out: Path, method: str, root: Path, lora: bool, *extra: str) -> tuple[Trainer, list[dict]]:
    config, pm = load_config(ROOT / "experiments" / "methods" / f"{method}.gin",
                             [*SMALL, *bindings(root, lora), f"TrainConfig.output_dir = '{out}'", *extra])
    trainer = Trainer(config, pm)
    history = trainer.train()
    trainer.backbone.module.eval()
    return trainer, history


# -- every method trains -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(ROLLOUT_NFE))
def test_every_method_trains_two_iterations_with_lora(tmp_path, qwen_dir, method):
    check_two_iterations(tmp_path, qwen_dir, method, lora=True)


def check_two_iterations(tmp_path, qwen_dir, method: str, lora: bool) -> None:
    """Two iterations of ``method``: on-policy at the first minibatch, the hand-counted NFE."""
    trainer, history = train(tmp_path / "run", method, qwen_dir, lora, "TrainConfig.iterations = 2")
    assert trainer.backbone.calls_per_velocity == 2 and trainer.backbone.lora_rank == (LORA["rank"] if lora else 0)
    assert len(history) == 2
    first = history[0]
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # on-policy at the first minibatch
    assert first["perf/nfe_rollout"] == pytest.approx(ROLLOUT_NFE[method])
    assert all(torch.isfinite(torch.tensor(m["policy/ratio_mean"])) for m in history)
    moved = [p for p in trainer.backbone.trainable_parameters() if p.abs().max() > 0]
    assert moved  # LoRA's B starts at 0: after two iterations the adapters hold something
