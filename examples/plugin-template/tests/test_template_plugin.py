"""The template's own tests: mixgrpo's contract mixins plus one value check of its own."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # also runs uninstalled

from mixgrpo_template.plugin import BrightnessReward, LinearNoiseSDE  # noqa: E402

from mixgrpo.testing import RewardContract, SamplerContract  # noqa: E402


class TestLinearNoiseSDEContract(SamplerContract):
    def make_sampler(self):
        return LinearNoiseSDE(noise_level=0.5)


class TestBrightnessContract(RewardContract):
    def make_reward(self):
        return BrightnessReward()


def test_log_prob_is_the_gaussian_density_of_the_draw():
    torch.manual_seed(0)
    sigmas = torch.tensor([1.0, 0.6, 0.3, 0.0])
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    res = LinearNoiseSDE(0.5).step(x, v, sigmas, 1)
    sigma, dt = 0.6, -0.3
    g = 0.5 * sigma
    mean = x.double() + dt * (v.double() + g * g / (2 * sigma) * (x.double() + (1 - sigma) * v.double()))
    std = g * math.sqrt(-dt)
    ref = torch.distributions.Normal(mean, std).log_prob(res.prev_sample.double()).flatten(1).mean(1)
    torch.testing.assert_close(res.log_prob.double(), ref, rtol=1e-5, atol=1e-5)


def test_brightness_orders_images():
    dark, light = torch.full((1, 3, 8, 8), 0.2), torch.full((1, 3, 8, 8), 0.9)
    scores = BrightnessReward()(torch.cat([dark, light]), ["a", "b"])
    torch.testing.assert_close(scores, torch.tensor([0.2, 0.9]))
