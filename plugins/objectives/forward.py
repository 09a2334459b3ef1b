"""What DiffusionNFT and AWM share: forward-process objectives (``MatchingObjective``).

Both train on the rollout's final latents ``x0``, re-noised at noise levels drawn from the rollout's
σ grid: ``x_σ = (1−σ)·x0 + σ·ε``, whose flow-matching target velocity is ``ε − x0``. They differ only
in the per-sample loss (``nft.py``, ``awm.py``). This module holds their common fields (advantages
as the GRPO objectives compute them, the σ draw, the KL to the frozen reference in velocity space)
and the matching log-likelihood both use as their on-policy ``ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from mixgrpo.core.advantages import group_advantages
from mixgrpo.core.interfaces import MatchingObjective
from mixgrpo.core.validators import positive
from mixgrpo.plugins.objectives.base import (
    adv_clip_field,
    aggregate_field,
    ddof_field,
    eps_field,
    kl_beta_field,
    std_field,
    weights_field,
)


def _fraction(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value}")


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...] → [B]``: the mean over every dimension but the batch."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def stratified_grid_steps(grid: torch.Tensor, count: int, fraction: float, include_first: bool,
                          generator: torch.Generator) -> torch.Tensor:
    """``count`` step indices of ``grid`` (descending σ, the last entry 0 excluded), one from each of
    ``count`` equal strata of the steps whose σ ≥ 1 − ``fraction`` (the noisy end of the grid);
    without ``include_first`` the span starts one step later (the first step, at σ ≈ 1, is left out).

    The strata are ``[⌊b_j⌋, ⌊b_{j+1}⌋)`` of ``count + 1`` evenly spaced boundaries ``b`` over the
    span's first and last indices; a stratum of width 0 gives its lower bound.
    """
    sigmas = grid[:-1].double()
    valid = torch.nonzero(sigmas >= 1.0 - fraction - 1e-6).flatten()
    if valid.numel() == 0:
        raise ValueError(f"no step of the σ grid has σ ≥ 1 − timestep_fraction = {1 - fraction:.3g}")
    first, last = int(valid.min()) + (0 if include_first else 1), int(valid.max())
    bounds = torch.linspace(first, last, count + 1, dtype=torch.float32)
    lower, upper = bounds[:-1].long(), bounds[1:].long()
    u = torch.rand(count, generator=generator)
    return (lower + (u * (upper - lower)).long()).clamp(0, sigmas.numel() - 1)


@attrs.frozen
class ForwardMatching(MatchingObjective):
    """The fields and helpers of a forward-process objective.

    Args:
        std, ddof, eps, aggregate, weights, adv_clip: the advantages, as ``ClippedGRPO``'s
            (``adv_clip`` also bounds the advantages the losses see).
        clip_range (`float`, defaults to 1e-4): the ratio clip (AWM's); the on-policy tolerance is a
            tenth of it.
        kl_beta (`float`, defaults to 0.0): weight of ``mean((v_new − v_ref)²)``, the KL to the frozen
            reference in velocity space (0: no reference model is run).
        num_timesteps (`int`, defaults to 4): K, the σ draws per sample and iteration.
        timestep_fraction (`float`, defaults to 0.9): draws come from the grid steps with
            σ ≥ 1 − fraction (the noisy part of the grid).
        include_first (`bool`, defaults to True): whether the first step (σ = 1) may be drawn.
    """

    std: str = std_field("group")
    ddof: float = ddof_field(0)
    eps: float = eps_field(1e-4)
    aggregate: str = aggregate_field("reward")
    weights: Mapping[str, float] | None = weights_field()
    adv_clip: float | None = adv_clip_field(5.0)
    clip_range: float = attrs.field(default=1e-4, converter=float, validator=positive)
    kl_beta: float = kl_beta_field(0.0)
    num_timesteps: int = attrs.field(default=4, converter=int, validator=positive)
    timestep_fraction: float = attrs.field(default=0.9, converter=float, validator=_fraction)
    include_first: bool = attrs.field(default=True, converter=bool)

    def advantages(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` float32 advantages (``mixgrpo.core.advantages.group_advantages``)."""
        return group_advantages(rewards, group_ids, std=self.std, ddof=self.ddof, eps=self.eps,
                                weights=self.weights, aggregate=self.aggregate, clip=self.adv_clip)

    def draw_sigmas(self, grid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """K grid σ values by stratified draws (``stratified_grid_steps``), the same for all N samples
        of the iteration (as the references draw them per batch)."""
        steps = stratified_grid_steps(grid, self.num_timesteps, self.timestep_fraction, self.include_first,
                                      generator)
        return grid[steps].float().unsqueeze(1).expand(-1, n).clone()

    def clipped_advantages(self, advantages: torch.Tensor) -> torch.Tensor:
        bound = self.adv_clip if self.adv_clip is not None else math.inf
        return advantages.clamp(-bound, bound)

    def reference_kl(self, v_new: torch.Tensor, v_ref: torch.Tensor | None) -> torch.Tensor:
        """``[B]`` ``mean((v_new − v_ref)²)`` (with grad), zeros without a reference."""
        if v_ref is None:
            if self.kl_beta > 0:
                raise ValueError(f"kl_beta={self.kl_beta} but no v_ref was passed: run the reference model")
            return torch.zeros(v_new.shape[0], device=v_new.device)
        return per_sample_mean((v_new - v_ref) ** 2)

    @staticmethod
    def matching_log_likelihood(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``[B]`` ``−mean((v − (ε − x0))²)``: the flow-matching log-likelihood surrogate (AWM's)."""
        return -per_sample_mean((v - (noise - x0)) ** 2)

    def statistics(self, log_ratio: torch.Tensor, policy: torch.Tensor, kl: torch.Tensor,
                   clipped: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The detached ``[B]`` statistics every objective reports."""
        return {"ratio": log_ratio.detach().exp(), "approx_kl": 0.5 * log_ratio.detach() ** 2,
                "clipped": (clipped if clipped is not None else torch.zeros_like(log_ratio)).detach().float(),
                "policy": policy.detach(), "kl": kl.detach()}

    @staticmethod
    def check_shapes(v_new: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                     sigma: torch.Tensor, advantages: torch.Tensor) -> None:
        if not v_new.shape == v_old.shape == x0.shape == noise.shape:
            raise ValueError(f"v_new {tuple(v_new.shape)}, v_old {tuple(v_old.shape)}, x0 {tuple(x0.shape)} and "
                             f"noise {tuple(noise.shape)} must have the same shape [B, *latent]")
        if sigma.shape != (v_new.shape[0],) or advantages.shape != (v_new.shape[0],):
            raise ValueError(f"sigma {tuple(sigma.shape)} and advantages {tuple(advantages.shape)} must be "
                             f"[{v_new.shape[0]}]")
