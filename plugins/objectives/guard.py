"""GRPO-Guard's regulated ratio (Wang et al., arXiv 2510.22319; docs/algorithms.md, "GRPO-Guard").

The plain per-step log-ratio of two Gaussian steps with a shared std ``s = g·√Δ`` is, per element
averaged, with ``d = μ_new − μ_old`` and the rollout's noise ``ξ = (x' − μ_old)/s``::

    log r = −mean(d²)/(2s²) + mean(d·ξ)/s

Its first term is never positive (the ratio shifts left of 1 once the policy moves) and both terms
scale with 1/s, which differs by orders of magnitude between the high- and low-noise steps. The
guard removes the bias and multiplies by s::

    log r̃ = s·(logp_new − logp_old) + mean(d²)/(2s) = mean(d·ξ)

so every step's ratio is centred on 1 with a spread that no longer depends on the step's σ, and its
gradient is s times the plain one at the on-policy point (the per-step reweighting).
"""

from __future__ import annotations

import torch

from mixgrpo.core.types import StepMoments

__all__ = ["StepMoments", "guard_log_ratio"]


def _per_transition_std(std: torch.Tensor | float, count: int, like: torch.Tensor) -> torch.Tensor:
    """The step std as ``[M]`` (a per-step std is one number per transition)."""
    s = torch.as_tensor(std, dtype=like.dtype, device=like.device)
    if s.numel() == 1:
        s = s.reshape(1).expand(count)
    elif s.numel() == count:
        s = s.reshape(count)
    else:
        raise ValueError(f"std has {s.numel()} values for {count} transitions: pass one std per transition "
                         "(StepResult.std of each transition's step) or one for all")
    if bool((s <= 0).any()):
        raise ValueError("the guard needs the step std s > 0: an ODE step has no ratio to regulate")
    return s


def guard_log_ratio(log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, moments: StepMoments) -> torch.Tensor:
    """GRPO-Guard's normalized log-ratio ``[M]``: ``s·(logp_new − logp_old) + mean(d²)/(2s)``.

    Args:
        log_prob_new: ``[M]`` log-probs under the current policy (with grad), averaged over elements
            (the samplers' default ``reduction="mean"``; the bias term assumes that average).
        log_prob_old: ``[M]`` the rollout's log-probs (no grad).
        moments: the step means and std of the M transitions.
    Returns:
        ``[M]``, 0 exactly where μ_new = μ_old (the on-policy check still reads ratio 1).
    Raises:
        ValueError: means whose shapes differ or do not have M rows, or a std that is not > 0.
    """
    mean_new, mean_old = moments.mean_new, moments.mean_old
    count = log_prob_new.shape[0]
    if mean_new.shape != mean_old.shape or mean_new.shape[0] != count:
        raise ValueError(f"guard moments: mean_new {tuple(mean_new.shape)} and mean_old {tuple(mean_old.shape)} "
                         f"must have the same shape, with {count} rows (one per transition)")
    s = _per_transition_std(moments.std, count, log_prob_new)
    diff = mean_new.to(log_prob_new.dtype) - mean_old.detach().to(log_prob_new.dtype)
    mse = diff.reshape(count, -1).pow(2).mean(dim=1)
    return s * (log_prob_new - log_prob_old.detach()) + mse / (2.0 * s)
