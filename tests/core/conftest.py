from pathlib import Path

import pytest

from mixgrpo.core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]

# Small enough for seconds on a CPU; everything else comes from the method preset.
TOY = [
    "TrainConfig.backbone = 'toy'",
    "TrainConfig.num_steps = 8",
    "TrainConfig.group_size = 3",
    "TrainConfig.prompts_per_iteration = 2",
    "TrainConfig.micro_batch_size = 4",
    "TrainConfig.rollout_batch_size = 4",
    "TrainConfig.iterations = 1",
    "TrainConfig.learning_rate = 1e-3",
    "TrainConfig.progress = False",
    "TrainConfig.rewards = {'shapes.preference': 1.0}",
    "ProgressiveWindow.window_size = 3",
    "FixedWindow.window_size = 3",
]


@pytest.fixture
def toy_config(tmp_path):
    def make(method: str, *extra: str):
        bindings = [*TOY, f"TrainConfig.output_dir = '{tmp_path / method}'", *extra]
        return load_config(ROOT / "experiments" / "methods" / f"{method}.gin", bindings)

    return make


class Counting:
    """Replaces a backbone's ``velocity`` and records the batch size (rows) of every call."""

    def __init__(self, backbone):
        self.rows, self.inner = [], backbone.velocity
        backbone.velocity = self

    def __call__(self, x, sigma, cond):
        self.rows.append(x.shape[0])
        return self.inner(x, sigma, cond)


def step_gradients(trainer, traj, rows, step):
    """The log-probs the trainer recomputes for ``rows`` at ``step``, and the gradient of their sum
    under distinct per-row weights (as advantages are), flattened over the trained parameters."""
    import torch

    trainer.backbone.module.zero_grad(set_to_none=True)
    log_prob = trainer._step_result(traj, step, rows)[0].log_prob
    weights = torch.linspace(-1.0, 2.0, len(rows))
    (log_prob * weights).sum().backward()
    params = [p for p in trainer.backbone.trainable_parameters() if p.grad is not None]
    return log_prob.detach(), torch.cat([p.grad.flatten() for p in params])
