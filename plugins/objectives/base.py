"""The clipped GRPO objective shared by FlowGRPO, DanceGRPO and MixGRPO (docs/algorithms.md §7, §8).

Per (sample, trained step) transition, with ``r = exp(logp_new − logp_old)``::

    term = max( −A·r, −A·clip(r, 1−ε, 1+ε) ) + β·KL

The trainer sums the terms and divides by the number of (sample, trained step) pairs. The three
methods differ only in their advantage options and defaults, set by the subclasses in
``flowgrpo.py``, ``dancegrpo.py`` and ``mixgrpo.py``. Objectives are frozen ``attrs`` classes whose
arguments are checked by validators (``mixgrpo.core.validators``); the ``*_field`` helpers below
give a subclass the same checks with its own defaults.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from mixgrpo.core.advantages import AGGREGATES, STD_MODES, group_advantages
from mixgrpo.core.interfaces import PolicyObjective
from mixgrpo.core.types import StepResult
from mixgrpo.core.validators import finite_non_negative, one_of, positive
from mixgrpo.plugins.objectives.guard import StepMoments, guard_log_ratio


# -- the fields of ClippedGRPO, with their checks, for subclasses that change a default ----------------
# Each returns an attrs field definition for a class body (``std: str = std_field("group")``). It is typed
# ``Any``: the object is attrs' field marker, which becomes the annotated ``str``/``float`` value only on
# an instance; the class annotation states that type.
def std_field(default: str) -> Any:
    return attrs.field(default=default, validator=one_of("std mode", STD_MODES))


def ddof_field(default: float) -> Any:
    return attrs.field(default=default, validator=[_real_number, finite_non_negative])


def eps_field(default: float) -> Any:
    return attrs.field(default=default, converter=float, validator=finite_non_negative)


def aggregate_field(default: str) -> Any:
    return attrs.field(default=default, validator=one_of("aggregate", AGGREGATES))


def weights_field() -> Any:
    return attrs.field(default=None, converter=attrs.converters.optional(dict))


def adv_clip_field(default: float | None) -> Any:
    return attrs.field(default=default, converter=attrs.converters.optional(float), validator=_positive_or_none)


def clip_range_field(default: float) -> Any:
    return attrs.field(default=default, converter=float, validator=positive)


def kl_beta_field(default: float) -> Any:
    return attrs.field(default=default, converter=float, validator=finite_non_negative)


def kl_include_dt_field(default: bool) -> Any:
    return attrs.field(default=default, converter=bool)


def guard_field(default: bool) -> Any:
    # left out of the repr so that the records' reprs read as before the option existed
    # (tests/plugins/test_objectives.py pins them); equality still compares it
    return attrs.field(default=default, converter=bool, repr=False)


def noise_weight_field(default: float) -> Any:
    # left out of the repr, as guard is
    return attrs.field(default=default, converter=float, validator=finite_non_negative, repr=False)


def _real_number(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A real number, not a bool (ddof keeps its type: 1 stays 1, as the references write it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{attribute.name} must be a number, got {value!r}")


def _positive_or_none(instance: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    """None (no clamp) or a number > 0 (NaN is not)."""
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, or None for no clamp, got {value}")


def in_base_order(cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    """attrs ``field_transformer`` that keeps ``ClippedGRPO``'s field order in a subclass.

    attrs moves a field that a subclass redefines (to change its default) to the end; with
    ``@attrs.frozen(field_transformer=in_base_order)`` the subclass redefines only the fields whose
    defaults differ and its signature and repr read as ``ClippedGRPO``'s (fields of its own follow).
    """
    order = {field.name: k for k, field in enumerate(attrs.fields(ClippedGRPO))}
    return sorted(fields, key=lambda field: order.get(field.name, len(order)))


def gaussian_kl(
    mean: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor | float,
    include_dt: bool = False,
    dt: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Closed-form KL between the policy's and the reference's step Gaussians (equal variances).

    ``‖μθ − μref‖² / (2·g²)`` averaged over the non-batch elements, where ``std`` is the diffusion
    coefficient g of the step. This is FlowGRPO's KL: the exact KL of the two step Gaussians
    ``N(μ, g²Δ)`` also divides by Δ, which the reference omits (absorbed into β).
    ``include_dt=True`` divides by ``g²·Δ`` and so returns the exact KL (per element, averaged).

    Args:
        mean: policy mean μθ ``[B, ...]`` (gradients flow through it).
        mean_ref: reference mean μref ``[B, ...]`` (same shape; usually computed without grad).
        std: the diffusion coefficient g (> 0), a float or a tensor broadcastable to ``mean``.
        include_dt: divide by Δ as well (the exact KL).
        dt: the step size (``σ_{i+1} − σ_i`` or its magnitude Δ; only |dt| is used), required when
            ``include_dt`` is True; float or tensor broadcastable to ``mean``.
    Returns:
        ``[B]`` fp32.
    Raises:
        ValueError: shape mismatch, ``include_dt`` without ``dt``, or g = 0 (an ODE step, where no
            step Gaussian exists).
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean has shape {tuple(mean.shape)} but mean_ref has {tuple(mean_ref.shape)}")
    g = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if bool((g <= 0).any()):
        raise ValueError("std (the diffusion coefficient g) must be > 0: the KL of an ODE step is undefined")
    var = g * g
    if include_dt:
        if dt is None:
            raise ValueError("include_dt=True needs dt (the step size Δ)")
        var = var * torch.as_tensor(dt, dtype=torch.float32, device=mean.device).abs()
    diff = mean.float() - mean_ref.float()
    per_element = diff * diff / (2.0 * var)
    return per_element.reshape(per_element.shape[0], -1).mean(dim=1)


@attrs.frozen
class ClippedGRPO(PolicyObjective):
    """Group-relative advantages and the PPO-style clipped policy loss, with an optional KL term.

    Args:
        std (`str`, defaults to `"group"`):
            Advantage std mode: ``"group"`` (per group) or ``"global"`` (all rewards of the batch).
        ddof (`float`, defaults to 1):
            Delta degrees of freedom of the std (1 unbiased, 0 population); >= 0.
        eps (`float`, defaults to 1e-8):
            Added to the std in the advantage denominator; >= 0.
        aggregate (`str`, defaults to `"advantage"`):
            Several rewards: ``"advantage"`` averages per-reward advantages (weights normalized to
            sum to 1); ``"reward"`` sums the weighted raw rewards and normalizes once.
        weights (`dict[str, float]`, defaults to None):
            Per-reward weights (None: equal), ``PolicyObjective``'s constructor keyword: the trainer
            passes ``TrainConfig.rewards``.
        adv_clip (`float`, defaults to 5.0):
            Advantages are clamped to ±adv_clip (> 0; None: no clamp).
        clip_range (`float`, defaults to 1e-4):
            The ratio clip ε (a trust region on the per-element-average log-prob).
        kl_beta (`float`, defaults to 0.0):
            Weight β of the KL to the frozen reference (0: no reference model is run).
        kl_include_dt (`bool`, defaults to False):
            False: FlowGRPO's KL ``‖Δμ‖²/(2g²)``; True: the exact step KL ``‖Δμ‖²/(2g²Δ)``.
        guard (`bool`, defaults to False):
            GRPO-Guard (``guard.py``): the ratio is ``exp(s·Δlogp + mean(Δμ²)/(2s))`` instead of
            ``exp(Δlogp)``; ``loss`` then needs the step moments (``moments=``).
        noise_weight (`float`, defaults to 0.0):
            TempFlow-GRPO's noise-aware weighting: > 0 multiplies each transition's clipped policy
            term by ``noise_weight·s``, s = g·√Δ the step's std, so that high-noise steps, where the
            exploration is, weigh more (the reference's FLUX script: 1.73); 0: unweighted. ``loss``
            then needs the step moments (``moments=``), whose std it reads.
    """

    std: str = std_field("group")
    ddof: float = ddof_field(1)
    eps: float = eps_field(1e-8)
    aggregate: str = aggregate_field("advantage")
    weights: Mapping[str, float] | None = weights_field()
    adv_clip: float | None = adv_clip_field(5.0)
    clip_range: float = clip_range_field(1e-4)
    kl_beta: float = kl_beta_field(0.0)
    kl_include_dt: bool = kl_include_dt_field(False)
    guard: bool = guard_field(False)
    noise_weight: float = noise_weight_field(0.0)

    @property
    def uses_step_moments(self) -> bool:
        """Whether ``loss`` needs the step means and std of each transition (GRPO-Guard, the
        noise-aware weighting)."""
        return self.guard or self.noise_weight > 0

    # -- advantages ------------------------------------------------------------------------------
    def advantages(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` float32 advantages (see ``mixgrpo.core.advantages.group_advantages``)."""
        return group_advantages(rewards, group_ids, std=self.std, ddof=self.ddof, eps=self.eps,
                                weights=self.weights, aggregate=self.aggregate, clip=self.adv_clip)

    # -- loss ------------------------------------------------------------------------------------
    def loss(
        self,
        log_prob_new: torch.Tensor,
        log_prob_old: torch.Tensor,
        advantages: torch.Tensor,
        kl: torch.Tensor | None = None,
        moments: StepMoments | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-transition terms ``[M]`` (with grad) and detached ``[M]`` statistics.

        ``moments`` (the step means and std, ``guard.StepMoments``) is required with ``guard`` or
        ``noise_weight`` and ignored without. Statistics: ``ratio`` r (the guarded ratio with
        ``guard``); ``clipped`` 1.0 where |r − 1| > ε; ``approx_kl`` ½·(logp_new − logp_old)², the
        usual low-variance estimate of the KL between the rollout and the current policy; ``policy``
        the clipped policy term (weighted with ``noise_weight``); ``kl`` the KL (zeros without).
        """
        if log_prob_new.shape != log_prob_old.shape or log_prob_new.shape != advantages.shape:
            raise ValueError(
                f"log_prob_new {tuple(log_prob_new.shape)}, log_prob_old {tuple(log_prob_old.shape)} and "
                f"advantages {tuple(advantages.shape)} must have the same shape [M]"
            )
        if kl is None and self.kl_beta > 0:
            raise ValueError(f"kl_beta={self.kl_beta} but no kl was passed: compute it with the reference model")
        if kl is not None and kl.shape != log_prob_new.shape:
            raise ValueError(f"kl has shape {tuple(kl.shape)}, expected {tuple(log_prob_new.shape)}")
        log_ratio = log_prob_new - log_prob_old.detach()
        ratio = torch.exp(self._regulated(log_prob_new, log_prob_old, moments) if self.guard else log_ratio)
        adv = advantages.detach().to(ratio.dtype)
        eps = self.clip_range
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
        policy = torch.maximum(unclipped, clipped)  # pessimistic: the clip only ever removes gain
        if self.noise_weight > 0:  # s > 0, so weighting the max weights both of its terms
            policy = self.noise_weight * self._step_std(moments, policy) * policy
        terms = policy if kl is None else policy + self.kl_beta * kl
        stats = {
            "ratio": ratio.detach(),
            "clipped": ((ratio.detach() - 1.0).abs() > eps).to(ratio.dtype),
            "approx_kl": 0.5 * log_ratio.detach() ** 2,
            "policy": policy.detach(),
            "kl": kl.detach() if kl is not None else torch.zeros_like(policy.detach()),
        }
        return terms, stats

    def _regulated(self, log_prob_new: torch.Tensor, log_prob_old: torch.Tensor,
                   moments: StepMoments | None) -> torch.Tensor:
        """GRPO-Guard's log-ratio ``[M]``; refuses a call without the moments it needs."""
        if moments is None:
            raise ValueError(
                "guard=True needs the step moments: call loss(..., moments=StepMoments(mean_new, mean_old, std)) "
                "with the SDE sampler's means of the current and the rollout policy and its std; or set guard=False"
            )
        return guard_log_ratio(log_prob_new, log_prob_old, moments)

    def _step_std(self, moments: StepMoments | None, like: torch.Tensor) -> torch.Tensor:
        """``[M]``: each transition's step std s from ``moments`` (a float or M values)."""
        if moments is None:
            raise ValueError(
                f"noise_weight={self.noise_weight} needs the step moments: call loss(..., moments=StepMoments("
                f"mean_new, mean_old, std)) with the SDE sampler's std; or set noise_weight=0"
            )
        std = torch.as_tensor(moments.std, dtype=like.dtype, device=like.device)
        return std.reshape(-1).expand(like.shape[0]) if std.numel() == 1 else std.reshape(like.shape[0])

    # -- KL to the reference ---------------------------------------------------------------------
    def kl(self, policy: StepResult, reference: StepResult, sigmas: torch.Tensor, index: int) -> torch.Tensor:
        """KL ``[B]`` between the policy's and the reference's Gaussians of step ``index``.

        ``policy`` and ``reference`` are the SDE sampler's results for the same ``x`` and
        ``prev_sample`` under the two models; their common std is ``g·√Δ``, so g = std/√Δ
        (for CPS this is the g for which ``g²Δ`` is its step variance).
        """
        delta = float(sigmas[index]) - float(sigmas[index + 1])
        if not delta > 0:
            raise ValueError(f"step {index} has Δ = {delta}: not a step of a decreasing σ grid")
        g = torch.as_tensor(policy.std, dtype=torch.float32) / math.sqrt(delta)
        return gaussian_kl(policy.mean, reference.mean, g.to(policy.mean.device), include_dt=self.kl_include_dt,
                           dt=delta)
