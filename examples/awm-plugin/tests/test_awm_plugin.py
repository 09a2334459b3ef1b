"""The package's own tests: mixgrpo's contract mixin for forward-process objectives, and agreement
with mixgrpo's in-tree AWM (uniform weighting) on the same inputs."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # also runs uninstalled

from mixgrpo_awm.plugin import ExampleAWM  # noqa: E402

from mixgrpo.testing import MatchingObjectiveContract  # noqa: E402


class TestExampleAWM(MatchingObjectiveContract):
    def make_objective(self):
        return ExampleAWM(num_timesteps=3)

    def with_weights(self, objective, weights):
        return ExampleAWM(weights=weights, num_timesteps=objective.num_timesteps)


def test_loss_equals_the_in_tree_awm():
    from mixgrpo.plugins.objectives.awm import AWM

    gen = torch.Generator().manual_seed(0)
    x0, noise, v_old = (torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    v_new = v_old + 0.1 * torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    sigma, adv = torch.linspace(0.9, 0.1, 5, dtype=torch.float64), torch.tensor([1.0, -2.0, 0.5, 7.0, -0.1])
    ours, _ = ExampleAWM(clip_range=0.05).loss(v_new, v_old, x0, noise, sigma, adv.double())
    in_tree = AWM(weighting="uniform", clip_range=0.05, adv_clip=5.0)
    theirs, _ = in_tree.loss(v_new, v_old, x0, noise, sigma, adv.double())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
