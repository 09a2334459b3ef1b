"""A sampler with a new noise form and a toy reward, registered through the ``mixgrpo`` entry point.

Copy this package, rename it, and replace the two classes with yours. Nothing else in mixgrpo
changes: after ``pip install -e .`` the names below appear in ``mixgrpo plugins`` and can be
selected from gin, e.g. ``TrainConfig.sde_sampler = 'template.linear'`` and
``LinearNoiseSDE.noise_level = 0.5``.
"""

from __future__ import annotations

import math

import torch

from mixgrpo import Reward, Sampler, StepResult, hookimpl


class LinearNoiseSDE(Sampler):
    """Euler–Maruyama step of the marginal-preserving reverse SDE with diffusion ``g = a·σ``.

    Any g keeps the marginals of rectified flow; this one injects noise proportional to σ (docs/algorithms.md §3
    gives the mean for every g). Log-prob: mean over non-batch elements of the Gaussian density.

    Args:
        noise_level: a, the slope of g in σ.
    """

    stochastic = True

    def __init__(self, noise_level: float = 0.5) -> None:
        if noise_level <= 0:
            raise ValueError(f"noise_level must be > 0, got {noise_level}")
        self.noise_level = noise_level

    def step(self, x, v, sigmas, index, *, history=None, prev_sample=None, noise=None):
        x, v = x.float(), v.float()
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        dt = sigma_next - sigma
        g = self.noise_level * sigma
        mean = x + dt * (v + g * g / (2 * sigma) * (x + (1 - sigma) * v))
        std = g * math.sqrt(-dt)
        if prev_sample is None:
            noise = torch.randn_like(x) if noise is None else noise.float()
            prev_sample = mean + std * noise
        target = prev_sample.detach().float()
        elem = -((target - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
        return StepResult(prev_sample=prev_sample, mean=mean, std=std,
                          log_prob=elem.flatten(1).mean(1), x0=x - sigma * v)


class BrightnessReward(Reward):
    """Mean brightness of each image in [0, 1] (a deliberately simple reward to copy from)."""

    name = "template.brightness"

    def __call__(self, images, prompts):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images: pass one prompt per image")
        return images.float().mean(dim=(1, 2, 3))


@hookimpl
def register_samplers(register):
    register("template.linear", LinearNoiseSDE)


@hookimpl
def register_rewards(register):
    register("template.brightness", BrightnessReward)
