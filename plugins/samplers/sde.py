"""SDE steps with log-probabilities: the ``flow``, ``dance`` and ``cps`` noise forms (docs/algorithms.md §3).

Every SDE step of FlowGRPO, DanceGRPO and MixGRPO is one Euler–Maruyama step of the
marginal-preserving reverse SDE of rectified flow; the forms differ only in the diffusion
coefficient g::

    μ  = x + dt · [ v + g²/(2σ) · (x + (1−σ)·v) ]         dt = σ_{i+1} − σ_i < 0, Δ = −dt
    x' = μ + g·√Δ · ξ,   ξ ~ N(0, I)

    flow:  g = a·sqrt(σ/(1−σ')),  σ' = σ except σ' = σ_1 when σ = 1   (FlowGRPO, MixGRPO)
    dance: g = η (constant)                                         (DanceGRPO)

CPS (coefficient-preserving sampling) replaces the Euler–Maruyama step by a step that keeps the
coefficients of the data and noise estimates exactly on the rectified-flow path::

    x̂0 = x − σ·v,  x̂1 = x + (1−σ)·v,  std = σ_{i+1}·sin(a·π/2),
    μ  = (1−σ_{i+1})·x̂0 + sqrt(σ_{i+1}² − std²)·x̂1

The log-prob of a step is the Gaussian log-density of ``x'`` under ``N(μ, std²)``, averaged (or
summed) over the non-batch elements, with the gradient flowing only through μ (through v).
"""

from __future__ import annotations

import math

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Sampler
from mixgrpo.core.types import SolverHistory, StepResult

FORMS = ("flow", "dance", "cps")
REDUCTIONS = ("mean", "sum")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_options(form: str, noise_level: float, reduction: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown SDE form {form!r}; valid forms: {', '.join(FORMS)}")
    if not noise_level > 0:  # also rejects NaN
        raise ValueError(
            f"noise_level must be > 0, got {noise_level} (a noise level of 0 is the ODE: use an ODE solver)"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown log-prob reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


def _grid_points(sigmas: torch.Tensor, index: int) -> tuple[float, float, float]:
    """``(σ_i, σ_{i+1}, σ_1)`` as python floats, after checking that step ``index`` exists."""
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 points, got shape {tuple(sigmas.shape)}")
    num_steps = sigmas.numel() - 1
    if not 0 <= index < num_steps:
        raise ValueError(f"step index {index} out of range for a grid of {num_steps} steps (0..{num_steps - 1})")
    grid = sigmas.detach().float().cpu()
    return float(grid[index]), float(grid[index + 1]), float(grid[1])


def flow_diffusion(sigma: float, sigma_1: float, a: float) -> float:
    """The flow form's ``g = a·sqrt(σ/(1−σ'))`` with ``σ' = σ_1`` at σ = 1 (else σ' = σ).

    The substitution avoids 1/0 at σ = 1 and, on the first step (Δ = 1 − σ_1), makes the per-step
    std ``g·√Δ`` exactly ``a``.
    """
    sigma_p = sigma_1 if sigma >= 1.0 else sigma
    return a * math.sqrt(sigma / (1.0 - sigma_p))


def step_std(form: str, noise_level: float, sigma: float, sigma_next: float, sigma_1: float) -> float:
    """The per-step standard deviation of ``x'`` (``g·√Δ`` for flow/dance, ``σ_{i+1}·sin(aπ/2)`` for CPS)."""
    delta = sigma - sigma_next
    if form == "flow":
        return flow_diffusion(sigma, sigma_1, noise_level) * math.sqrt(max(delta, 0.0))
    if form == "dance":
        return noise_level * math.sqrt(max(delta, 0.0))
    return sigma_next * math.sin(noise_level * math.pi / 2.0)


def _step_mean(
    form: str, noise_level: float, x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float,
    sigma_1: float, std: float,
) -> torch.Tensor:
    """The mean μ ``[B, ...]`` fp32 of ``x'`` given ``x`` (fp32, ``[B, ...]``) and ``v``."""
    x1_hat = x + (1.0 - sigma) * v  # the noise estimate ε̂
    if form == "cps":
        x0_hat = x - sigma * v
        # max(…, 0) only guards rounding: std ≤ σ_{i+1} since |sin| ≤ 1.
        return (1.0 - sigma_next) * x0_hat + math.sqrt(max(sigma_next**2 - std**2, 0.0)) * x1_hat
    g = flow_diffusion(sigma, sigma_1, noise_level) if form == "flow" else noise_level
    dt = sigma_next - sigma
    # score correction of the marginal-preserving reverse SDE: −ε̂/σ is the score of x_σ
    return x + dt * (v + (g * g / (2.0 * sigma)) * x1_hat)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: float, reduction: str = "mean") -> torch.Tensor:
    """``log N(sample; mean, std²)`` reduced over the non-batch elements: ``[B]`` fp32.

    ``sample`` is detached so the gradient flows only through ``mean``. Elementwise terms are
    formed first and then reduced, as in all three references.
    """
    diff = sample.detach() - mean
    per_element = -(diff * diff) / (2.0 * std * std) - math.log(std) - _HALF_LOG_2PI
    flat = per_element.reshape(per_element.shape[0], -1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigmas: torch.Tensor,
    index: int,
    *,
    form: str,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> StepResult:
    """One SDE step from ``sigmas[index]`` to ``sigmas[index + 1]`` with its log-probability.

    Args:
        x: latents ``x_i`` ``[B, ...]`` (any float dtype; cast to fp32).
        v: velocity ``v ≈ ε − x0`` at ``(x, σ_i)`` ``[B, ...]`` (cast to fp32; gradients flow).
        sigmas: 1-D grid of T+1 values from 1 to 0.
        index: the step i, ``0 ≤ i < T``.
        form: ``"flow"``, ``"dance"`` or ``"cps"``.
        noise_level: ``a`` for flow and cps, ``η`` for dance; must be > 0.
        prev_sample: a given ``x_{i+1}`` ``[B, ...]`` whose log-prob to evaluate (nothing is drawn).
        noise: the standard normal ``ξ`` ``[B, ...]`` to draw with (ignored when ``prev_sample`` is
            given); drawn with ``generator`` when omitted.
        reduction: ``"mean"`` (the references' per-element average) or ``"sum"`` over non-batch
            elements.
        generator: RNG for ``ξ`` when neither ``prev_sample`` nor ``noise`` is given.
    Returns:
        ``StepResult``: prev_sample and mean ``[B, ...]`` fp32, std a 0-d fp32 tensor (``g·√Δ``, or
        ``σ_{i+1}·sin(aπ/2)`` for CPS), log_prob ``[B]`` fp32, x0 ``x − σ·v`` ``[B, ...]`` fp32.
    Raises:
        ValueError: unknown form or reduction, index out of range, ``noise_level ≤ 0``, shape
            mismatch, or a step whose std is 0 (where the log-prob is undefined).
    """
    _check_options(form, noise_level, reduction)
    sigma, sigma_next, sigma_1 = _grid_points(sigmas, index)
    if v.shape != x.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but x has {tuple(x.shape)}")
    std = step_std(form, noise_level, sigma, sigma_next, sigma_1)
    if not std > 0:
        raise ValueError(
            f"the {form!r} SDE step {index} (σ {sigma:.4g} → {sigma_next:.4g}) has std 0: the log-prob is "
            "undefined at std 0; take this step (usually the last one, into σ = 0) as an ODE step"
        )
    x, v = x.float(), v.float()
    mean = _step_mean(form, noise_level, x, v, sigma, sigma_next, sigma_1, std)
    if prev_sample is None:
        if noise is None:
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        elif noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but x has {tuple(x.shape)}")
        prev_sample = mean + std * noise.to(device=x.device, dtype=torch.float32)
    else:
        if prev_sample.shape != x.shape:
            raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)} but x has {tuple(x.shape)}")
        prev_sample = prev_sample.to(device=x.device, dtype=torch.float32)
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)
    return StepResult(
        prev_sample=prev_sample,
        mean=mean,
        std=torch.tensor(std, dtype=torch.float32, device=x.device),
        log_prob=log_prob,
        x0=x - sigma * v,
    )


class _SDESampler(Sampler):
    """Shared wrapper: a stochastic ``Sampler`` that calls ``sde_step`` with a fixed form."""

    stochastic = True
    form: str = ""

    def __init__(self, noise_level: float, reduction: str = "mean") -> None:
        _check_options(self.form, noise_level, reduction)
        self.noise_level = float(noise_level)
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(noise_level={self.noise_level}, reduction={self.reduction!r})"

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
        # history is unused: SDE steps are single-step; the rollout records x0 itself.
        return sde_step(
            x, v, sigmas, index, form=self.form, noise_level=self.noise_level,
            prev_sample=prev_sample, noise=noise, reduction=self.reduction,
        )


class FlowSDE(_SDESampler):
    """FlowGRPO / MixGRPO SDE step: ``g = a·sqrt(σ/(1−σ'))`` (σ' = σ_1 at σ = 1).

    Args:
        noise_level (`float`, defaults to 0.7):
            The noise scale ``a`` (> 0). Paper defaults: 0.7 for FlowGRPO on SD3.5 and for
            MixGRPO on FLUX; 0.9 for FlowGRPO on FLUX. The first step's std is exactly ``a``.
        reduction (`"mean"` or `"sum"`, defaults to `"mean"`):
            How the per-element Gaussian log-density is reduced over non-batch elements. All
            references use the mean (their clip range 1e-4 is calibrated for it); a sum needs a
            different clip range.
    """

    form = "flow"

    def __init__(self, noise_level: float = 0.7, reduction: str = "mean") -> None:
        super().__init__(noise_level, reduction)


class DanceSDE(_SDESampler):
    """DanceGRPO SDE step: constant diffusion ``g = η``, so the per-step std is ``η·√Δ``.

    Args:
        noise_level (`float`, defaults to 0.3):
            The constant diffusion coefficient ``η`` (> 0). Paper defaults: 0.3 for images,
            0.25 for video.
        reduction (`"mean"` or `"sum"`, defaults to `"mean"`):
            How the per-element Gaussian log-density is reduced over non-batch elements (the
            reference uses the mean).
    """

    form = "dance"

    def __init__(self, noise_level: float = 0.3, reduction: str = "mean") -> None:
        super().__init__(noise_level, reduction)


class CPSSDE(_SDESampler):
    """Coefficient-preserving sampling (newer FlowGRPO and MixGRPO code): std ``σ_{i+1}·sin(aπ/2)``.

    The std is 0 on a step into σ = 0, so the last step must be an ODE step (``step`` raises there, and
    ``supports_final_step = False`` lets the trainer refuse a schedule that samples it before anything loads).

    Args:
        noise_level (`float`, defaults to 0.8):
            The angle parameter ``a`` (> 0) of ``std = σ_{i+1}·sin(a·π/2)``; paper default 0.8.
        reduction (`"mean"` or `"sum"`, defaults to `"mean"`):
            How the per-element Gaussian log-density is reduced over non-batch elements.
    """

    form = "cps"
    supports_final_step = False  # std σ_{i+1}·sin(aπ/2) is 0 on the step into σ = 0

    def __init__(self, noise_level: float = 0.8, reduction: str = "mean") -> None:
        super().__init__(noise_level, reduction)


@hookimpl
def register_samplers(register):
    register("sde.flow", FlowSDE)
    register("sde.dance", DanceSDE)
    register("sde.cps", CPSSDE)
