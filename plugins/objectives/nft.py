"""DiffusionNFT (Zheng et al., arXiv 2509.16117): negative-aware fine-tuning on the forward process.

The rollout policy's velocity ``v_old`` and the current one ``v_θ`` define an implicit positive and
negative policy around ``v_old`` (β the guidance strength)::

    v⁺ = β·v_θ + (1 − β)·v_old          v⁻ = (1 + β)·v_old − β·v_θ

Each is trained toward the sample ``x0`` in x0-space, ``x̂0 = x_σ − σ·v``, with a per-sample weight
``w = mean|x̂0 − x0|`` (no gradient) that makes the loss scale-free; the optimality probability
``r = clip(A/c, −1, 1)/2 + 1/2`` (c the advantage clip) weighs positive against negative::

    L = c · ( r·mean((x̂0⁺ − x0)²)/w⁺ + (1 − r)·mean((x̂0⁻ − x0)²)/w⁻ ) / β  +  kl_beta·mean((v_θ − v_ref)²)

A well-rewarded sample pulls v_θ toward the velocity that reaches it, a badly rewarded one pushes
it away (through v⁻), with no likelihood and no SDE: the rollout may use any ODE solver.
"""

from __future__ import annotations

import attrs
import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.validators import positive
from mixgrpo.plugins.objectives.forward import ForwardMatching, per_sample_mean


def _x0_loss(x_sigma: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``mean((x̂0 − x0)²) / w`` with ``x̂0 = x_σ − σ·v`` and ``w = max(mean|x̂0 − x0|, 1e-5)``
    computed in float64 without gradient (the adaptive weight of the DiffusionNFT code)."""
    x0_hat = x_sigma - sigma * v
    with torch.no_grad():
        w = per_sample_mean((x0_hat.double() - x0.double()).abs()).clamp(min=1e-5)
    return per_sample_mean((x0_hat - x0) ** 2) / w.to(x0_hat.dtype)


@attrs.frozen
class DiffusionNFT(ForwardMatching):
    """DiffusionNFT's objective.

    Args: as ``ForwardMatching`` (advantages per group with population std, the rewards summed
    before one normalisation, ``adv_clip`` 5 as the reference's ``adv_clip_max``), and:
        beta (`float`, defaults to 1.0): β, the strength of the implicit guidance (the paper's
            default 1: ``v⁺ = v_θ`` and ``v⁻ = 2·v_old − v_θ``).
    """

    beta: float = attrs.field(default=1.0, converter=float, validator=positive)

    def loss(self, v_new, v_old, x0, noise, sigma, advantages, v_ref=None):
        """Per-sample ``[B]`` losses (see the module docstring) and their statistics; ``ratio`` is
        ``exp`` of the change of the matching log-likelihood, 1 while ``v_new == v_old``."""
        self.check_shapes(v_new, v_old, x0, noise, sigma, advantages)
        if self.adv_clip is None:
            raise ValueError("DiffusionNFT needs adv_clip (its optimality probability is A / adv_clip)")
        s = sigma.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        x_sigma = (1 - s) * x0 + s * noise
        r = (self.clipped_advantages(advantages) / self.adv_clip / 2 + 0.5).clamp(0, 1)
        positive_v = self.beta * v_new + (1 - self.beta) * v_old
        negative_v = (1 + self.beta) * v_old - self.beta * v_new
        policy = self.adv_clip * (r * _x0_loss(x_sigma, s, positive_v, x0)
                                  + (1 - r) * _x0_loss(x_sigma, s, negative_v, x0)) / self.beta
        kl = self.reference_kl(v_new, v_ref)
        log_ratio = self.matching_log_likelihood(v_new, x0, noise) - self.matching_log_likelihood(v_old, x0, noise)
        return policy + self.kl_beta * kl, self.statistics(log_ratio, policy, kl)


@hookimpl
def register_objectives(register):
    register("diffusionnft", DiffusionNFT)
