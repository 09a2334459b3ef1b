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
