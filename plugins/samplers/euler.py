"""Euler ODE step of the probability-flow ODE: ``x' = x + dt·v`` (the ``ode`` form, g = 0)."""

from __future__ import annotations

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Sampler
from mixgrpo.core.types import SolverHistory, StepResult


class Euler(Sampler):
    """First-order Euler step ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v``. No configuration."""

    stochastic = False

    def step(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        sigmas: torch.Tensor,
        index: int,
        *,
        history: SolverHistory | None = None,
        prev_sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> StepResult:
        x, v = x.float(), v.float()
        sigma, sigma_next = sigmas[index].item(), sigmas[index + 1].item()
        x_next = x + (sigma_next - sigma) * v
        return StepResult(prev_sample=x_next, mean=x_next, std=0.0, log_prob=None, x0=x - sigma * v)


@hookimpl
def register_samplers(register):
    register("euler", Euler)
