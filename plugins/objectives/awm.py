"""AWM, Advantage Weighted Matching (Xue et al., arXiv 2509.25050): the pretraining flow-matching
loss, weighted by the advantage.

The matching log-likelihood of a sample at one σ draw is ``ℓ = −w(σ)·mean((v − (ε − x0))²)`` (or a
generalised Huber form of the same error); with ``ρ = exp(ℓ_θ − ℓ_old)`` the loss is the clipped
policy-gradient loss of the GRPO objectives with ℓ in place of the SDE log-prob::

    L = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) + kl_beta·mean((v_θ − v_ref)²)

At ρ = 1 its gradient is ``A·∇ mean((v_θ − (ε − x0))²)·w``: flow matching on the policy's own samples,
weighted by their advantage. No SDE: the rollout may use any ODE solver.
"""

from __future__ import annotations

import attrs
import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.validators import one_of, positive
from mixgrpo.plugins.objectives.forward import ForwardMatching, per_sample_mean

WEIGHTINGS = ("uniform", "t", "t**2", "huber", "ghuber")


@attrs.frozen
class AWM(ForwardMatching):
    """AWM's objective.

    Args: as ``ForwardMatching``, and:
        weighting (`str`, defaults to ``"uniform"``): w(σ) of the matching error e = mean((v − (ε − x0))²):
            ``uniform`` (−e), ``t`` (−σ·e), ``t**2`` (−σ²·e), ``huber`` (−σ·(√e − 1e-5)),
            ``ghuber`` (−σ·((e + 1e-10)^p − 1e-10^p)/p, the generalised Huber of power p).
        ghuber_power (`float`, defaults to 0.25): p of ``ghuber``.
    """

    weighting: str = attrs.field(default="uniform", validator=one_of("weighting", WEIGHTINGS))
    ghuber_power: float = attrs.field(default=0.25, converter=float, validator=positive)

    def log_likelihood(self, v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       sigma: torch.Tensor) -> torch.Tensor:
        """``[B]`` the weighted matching log-likelihood ℓ (with grad through ``v``)."""
        error = per_sample_mean((v - (noise - x0)) ** 2)
        t = sigma.to(error.dtype)
        if self.weighting == "uniform":
            return -error
        if self.weighting == "t":
            return -error * t
        if self.weighting == "t**2":
            return -error * t ** 2
        if self.weighting == "huber":
            return -(torch.sqrt(error + 1e-10) - 1e-5) * t
        eps = torch.tensor(1e-10, dtype=error.dtype, device=error.device)
        p = self.ghuber_power
        return -(torch.pow(error + eps, p) - torch.pow(eps, p)) * t / p

    def loss(self, v_new, v_old, x0, noise, sigma, advantages, v_ref=None):
        """Per-sample ``[B]`` clipped losses (see the module docstring) and their statistics."""
        self.check_shapes(v_new, v_old, x0, noise, sigma, advantages)
        adv = self.clipped_advantages(advantages)
        log_ratio = self.log_likelihood(v_new, x0, noise, sigma) - self.log_likelihood(v_old, x0, noise, sigma)
        ratio = log_ratio.exp()
        policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range))
        kl = self.reference_kl(v_new, v_ref)
        clipped = ((ratio - 1).abs() > self.clip_range).float()
        return policy + self.kl_beta * kl, self.statistics(log_ratio, policy, kl, clipped)


@hookimpl
def register_objectives(register):
    register("awm", AWM)
