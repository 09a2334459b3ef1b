"""Step 5 of the loop for a ``MatchingObjective`` (forward-process objectives: DiffusionNFT, AWM).

The rollout recorded no transitions, only each sample's final latents ``x0``. Training re-noises
them: the objective draws K noise levels per sample (``draw_sigmas``), the noise ε is keyed by
(seed, iteration), and ``x_σ = (1−σ)·x0 + σ·ε``. The rollout policy's velocity at every ``(x_σ, σ)``
is computed once, before the first update (``v_old``); then each minibatch of samples takes one
optimizer step on the mean of the objective's per-(sample, σ draw) losses. The first minibatch runs
before any update, so its ``v_new`` equals ``v_old`` and its ``ratio`` statistic is 1: the on-policy
check of the GRPO objectives holds here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mixgrpo.core.rollout import keyed_generator, keyed_normal
from mixgrpo.core.steps import OptimizerSteps
from mixgrpo.core.types import Trajectories

if TYPE_CHECKING:
    from mixgrpo.core.trainer import Trainer


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_σ = (1−σ)·x0 + σ·ε`` for a batch: ``x0``, ``noise`` ``[B, *latent]``, ``sigma`` ``[B]``."""
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1 - s) * x0 + s * noise


def draw(trainer: Trainer, traj: Trajectories, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The iteration's noise levels ``[K, N]`` (the objective's) and noise ``[K, N, *latent]`` (fp32),
    both keyed by (seed, iteration, sample): the same on every process for the same sample."""
    c, n = trainer.config, len(traj)
    sigma = trainer.objective.draw_sigmas(traj.sigmas, n, keyed_generator(c.seed, iteration, "matching-sigma"))
    if sigma.dim() != 2 or sigma.shape[1] != n:
        raise ValueError(f"{type(trainer.objective).__name__}.draw_sigmas returned shape {tuple(sigma.shape)}; "
                         f"expected [K, {n}]")
    if not bool(((sigma > 0) & (sigma <= 1)).all()):
        raise ValueError(f"{type(trainer.objective).__name__}.draw_sigmas returned noise levels outside (0, 1]")
    shape = (sigma.shape[0], *traj.latents.shape[1:])
    noise = torch.stack([keyed_normal(shape, c.seed, iteration, "matching-noise", int(s)) for s in traj.sample_ids],
                        dim=1)
    return sigma.float(), noise


@torch.no_grad()
def old_velocities(trainer: Trainer, traj: Trajectories, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rollout policy's velocity ``[K, N, *latent]`` at every ``(x_σ, σ)``, before any update."""
    backbone, size = trainer.backbone, trainer.config.micro_batch_size
    out = torch.empty_like(noise)
    for k in range(sigma.shape[0]):
        for rows in torch.arange(len(traj)).split(size):
            out[k, rows] = _velocity(backbone, traj, sigma[k], noise[k], rows).float().cpu()
    return out


def _velocity(backbone: Any, traj: Trajectories, sigma: torch.Tensor, noise: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:
    device = backbone.device
    x = noised(traj.latents[rows], noise[rows], sigma[rows]).to(device)
    return backbone.velocity(x, sigma[rows].to(device), traj.cond.select(rows).to(device))


def optimize(trainer: Trainer, traj: Trajectories, advantages: torch.Tensor, iteration: int) -> dict[str, float]:
    """Optimizer steps of a ``MatchingObjective`` over the iteration's samples; the policy metrics.

    ``num_minibatches`` minibatches of samples (the same keyed order as the GRPO objectives'), each
    one optimizer step on all K σ draws of its samples, in micro-batches of ``micro_batch_size``.
    """
    c, objective, backbone = trainer.config, trainer.objective, trainer.backbone
    n = len(traj)
    sigma, noise = draw(trainer, traj, iteration)
    v_old = old_velocities(trainer, traj, sigma, noise)
    num_draws = sigma.shape[0]
    order = torch.randperm(n, generator=keyed_generator(c.seed, iteration, "minibatches"))
    steps = OptimizerSteps(trainer, iteration)

    def losses(k: int, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _losses(trainer, traj, sigma[k], noise[k], v_old[k], advantages, rows)

    for mb_index, mb in enumerate(order.chunk(c.num_minibatches)):
        chunks = [(k, rows) for k in range(num_draws) for rows in mb.sort().values.split(c.micro_batch_size)]
        steps.step(mb_index, chunks, len(mb) * num_draws, losses)
    # per sample: K velocities before the updates, K with grad, and K of the reference when it is used
    calls = backbone.calls_per_velocity * num_draws * (3 if objective.uses_reference else 2)
    return steps.metrics(nfe_train=float(calls))


def _losses(trainer: Trainer, traj: Trajectories, sigma: torch.Tensor, noise: torch.Tensor, v_old: torch.Tensor,
            advantages: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's per-sample losses at one σ draw for the samples ``rows`` (with grad)."""
    backbone, objective = trainer.backbone, trainer.objective
    device = backbone.device
    v_new = _velocity(backbone, traj, sigma, noise, rows).float()
    v_ref = None
    if objective.uses_reference:
        with torch.no_grad(), backbone.reference():
            v_ref = _velocity(backbone, traj, sigma, noise, rows).float()
    return objective.loss(v_new, v_old[rows].to(device), traj.latents[rows].to(device), noise[rows].to(device),
                          sigma[rows].to(device), advantages[rows].to(device), v_ref)
