"""Multistep DPM-Solver++ (data prediction, 2M "midpoint") for rectified flow (docs/algorithms.md §6).

For rectified flow ``α = 1 − σ``, ``λ = log(α/σ)`` and the data prediction is ``m = x̂0 = x − σ·v``.
One step from σ_s to σ_t (``h = λ_t − λ_s > 0``):

- first order: ``x_t = (σ_t/σ_s)·x − α_t·(e^{−h} − 1)·m0``;
- 2M: ``x_t = (σ_t/σ_s0)·x − α_t(e^{−h}−1)·D0 − ½·α_t(e^{−h}−1)·D1`` with ``D0 = m0``,
  ``D1 = (m0 − m1)/r0``, ``r0 = (λ_s0 − λ_s1)/h`` and ``m1`` the data estimate of the previous step.

``e^{−h}`` is evaluated as ``(α_s·σ_t)/(σ_s·α_t)``, which needs no logarithm and is exact at the
ends of the grid: at σ_s = 1 (λ_s = −∞) it is 0 and at σ_t = 0 (λ_t = +∞) it is 0 too.

The first-order step is Euler for RF: with ``m0 = x − σ_s·v`` the coefficient of x is
``σ_t/σ_s + α_t − α_s·σ_t/σ_s = σ_t·(1 − α_s)/σ_s + α_t = σ_t + 1 − σ_t = 1`` and the
coefficient of v is ``−σ_s·α_t + α_s·σ_t = −σ_s(1 − σ_t) + (1 − σ_s)σ_t = σ_t − σ_s``, so
``x_t = x + (σ_t − σ_s)·v`` (at σ_s = 1 too, where ``x_t = σ_t·x + (1 − σ_t)·x̂0``).
"""

from __future__ import annotations

import math

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Sampler
from mixgrpo.core.types import SolverHistory, StepResult


def _log_snr(sigma: float) -> float:
    """``λ = log((1 − σ)/σ)``; −∞ at σ = 1 and +∞ at σ = 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


def _exp_neg_h(sigma_s: float, sigma_t: float) -> float:
    """``e^{−h} = e^{λ_s − λ_t} = (α_s·σ_t)/(σ_s·α_t)`` for ``σ_s > σ_t`` (finite at both grid ends)."""
    return ((1.0 - sigma_s) * sigma_t) / (sigma_s * (1.0 - sigma_t))


class DPMSolverPP(Sampler):
    """Multistep DPM-Solver++ in data-prediction form for rectified flow (MixGRPO-Flash's post-window solver).

    The second-order (2M, "midpoint") update reads the previous step's data estimate from
    ``history.last()``; the rollout appends to the history after every step (SDE/window steps
    included) and this solver never appends itself. It falls back to the first-order update (Euler
    for RF) when there is no usable history entry (none, or its σ is not above the current σ), when
    the previous σ is 1 (``λ = −∞`` so ``D1 = 0``, as in diffusers), and on the last step into
    σ = 0, where the update returns the data estimate ``x̂0`` (``λ_t = +∞``).

    Args:
        order (`int`, defaults to 2):
            1 (DPM-Solver++ 1, identical to Euler for rectified flow) or 2 (2M midpoint, the
            MixGRPO-Flash default).
    """

    stochastic = False

    def __init__(self, order: int = 2) -> None:
        if order not in (1, 2):
            raise ValueError(f"DPMSolverPP order must be 1 or 2, got {order!r}")
        self.order = int(order)

    def __repr__(self) -> str:
        return f"DPMSolverPP(order={self.order})"

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
        """One step ``σ_s = sigmas[index] → σ_t = sigmas[index + 1]``.

        Args:
            x, v: latents and velocity ``[B, ...]`` (cast to fp32).
            sigmas: 1-D grid from 1 to 0.
            index: the step i.
            history: earlier ``(σ, x̂0)`` pairs; the last one is ``m1`` for the 2M update.
            prev_sample, noise: ignored (deterministic solver).
        Returns:
            ``StepResult(prev_sample, mean=prev_sample, std=0.0, log_prob=None, x0=x̂0)`` fp32.
        """
        num_steps = sigmas.numel() - 1
        if sigmas.dim() != 1 or not 0 <= index < num_steps:
            raise ValueError(f"step index {index} out of range for a 1-D grid of {num_steps} steps")
        x, v = x.float(), v.float()
        sigma_s, sigma_t = float(sigmas[index]), float(sigmas[index + 1])
        m0 = x - sigma_s * v
        previous = self._previous(history, sigma_s, sigma_t)
        if previous is None:
            x_t = self._first_order(x, m0, sigma_s, sigma_t)
        else:
            x_t = self._second_order(x, m0, previous, sigma_s, sigma_t)
        return StepResult(prev_sample=x_t, mean=x_t, std=0.0, log_prob=None, x0=m0)

    def _previous(
        self, history: SolverHistory | None, sigma_s: float, sigma_t: float
    ) -> tuple[float, torch.Tensor] | None:
        """The ``(σ_s1, m1)`` the 2M update uses, or None where the step is first order."""
        if self.order == 1 or history is None or sigma_t <= 0.0:
            return None
        last = history.last()
        if last is None:
            return None
        sigma_s1, m1 = last
        # σ_s1 = 1 gives λ_s1 = −∞, r0 = ∞ and D1 = 0: exactly the first-order step.
        if not sigma_s < sigma_s1 < 1.0:
            return None
        return sigma_s1, m1

    @staticmethod
    def _first_order(x: torch.Tensor, m0: torch.Tensor, sigma_s: float, sigma_t: float) -> torch.Tensor:
        alpha_t = 1.0 - sigma_t
        return (sigma_t / sigma_s) * x - (alpha_t * (_exp_neg_h(sigma_s, sigma_t) - 1.0)) * m0

    @staticmethod
    def _second_order(
        x: torch.Tensor, m0: torch.Tensor, previous: tuple[float, torch.Tensor], sigma_s: float, sigma_t: float
    ) -> torch.Tensor:
        sigma_s1, m1 = previous
        m1 = m1.to(device=m0.device, dtype=torch.float32)
        if m1.shape != m0.shape:
            raise ValueError(f"history x0 has shape {tuple(m1.shape)} but x has {tuple(m0.shape)}")
        h = _log_snr(sigma_t) - _log_snr(sigma_s)  # finite: 0 < σ_t < σ_s < 1 here
        r0 = (_log_snr(sigma_s) - _log_snr(sigma_s1)) / h
        alpha_t = 1.0 - sigma_t
        coef = alpha_t * (math.exp(-h) - 1.0)
        d1 = (m0 - m1) / r0
        return (sigma_t / sigma_s) * x - coef * m0 - 0.5 * coef * d1


@hookimpl
def register_samplers(register):
    register("dpmsolver++", DPMSolverPP)
