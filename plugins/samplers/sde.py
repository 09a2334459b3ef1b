"""SDE steps with log-probabilities: the ``flow``, ``dance`` and ``cps`` noise forms (docs/algorithms.md §3).

Every SDE step draws ``x' = μ + std·ξ`` (ξ ~ N(0, I)) and scores ``x'`` by its Gaussian log-density;
a noise form is a class that says what ``std`` and ``μ`` are. ``SDESampler`` holds what the forms share
(the grid checks, the draw or the given ``prev_sample``, the log-prob); ``ReverseSDE`` adds the
Euler–Maruyama step of the marginal-preserving reverse SDE of rectified flow, whose forms differ only
in the diffusion coefficient g::

    μ  = x + dt · [ v + g²/(2σ) · (x + (1−σ)·v) ]         dt = σ_{i+1} − σ_i < 0, Δ = −dt
    x' = μ + g·√Δ · ξ

    FlowSDE  (flow):  g = a·sqrt(σ/(1−σ')),  σ' = σ except σ' = σ_1 when σ = 1   (FlowGRPO, MixGRPO)
    DanceSDE (dance): g = η (constant)                                         (DanceGRPO)

``CPSSDE`` (coefficient-preserving sampling) replaces the Euler–Maruyama step by a step that keeps the
coefficients of the data and noise estimates exactly on the rectified-flow path::

    x̂0 = x − σ·v,  x̂1 = x + (1−σ)·v,  std = σ_{i+1}·sin(a·π/2),
    μ  = (1−σ_{i+1})·x̂0 + sqrt(σ_{i+1}² − std²)·x̂1

The log-prob of a step is the Gaussian log-density of ``x'`` under ``N(μ, std²)``, averaged (or
summed) over the non-batch elements, with the gradient flowing only through μ (through v).

A new noise form subclasses ``ReverseSDE`` and defines ``diffusion`` (any g keeps the marginals), or
subclasses ``SDESampler`` and defines ``std`` and ``mean``.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import attrs
import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Sampler
from mixgrpo.core.types import SolverHistory, StepResult

REDUCTIONS = ("mean", "sum")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@attrs.frozen
class GridStep:
    """Step ``index`` of a σ grid, as python floats: what a noise form's ``std`` and ``mean`` read.

    Attributes:
        index: the step i.
        sigma: σ_i, where the step starts.
        sigma_next: σ_{i+1}, where it ends.
        sigma_1: the grid's second point σ_1 (the flow form's σ' on the step from σ = 1).
    """

    index: int
    sigma: float
    sigma_next: float
    sigma_1: float

    @property
    def delta(self) -> float:
        """``Δ = σ_i − σ_{i+1}`` (> 0 on a decreasing grid)."""
        return self.sigma - self.sigma_next

    @classmethod
    def of(cls, sigmas: torch.Tensor, index: int) -> GridStep:
        """Step ``index`` of the 1-D grid ``sigmas``, after checking that the step exists."""
        if sigmas.dim() != 1 or sigmas.numel() < 2:
            raise ValueError(f"sigmas must be a 1-D grid of at least 2 points, got shape {tuple(sigmas.shape)}")
        num_steps = sigmas.numel() - 1
        if not 0 <= index < num_steps:
            raise ValueError(f"step index {index} out of range for a grid of {num_steps} steps (0..{num_steps - 1})")
        grid = sigmas.detach().float().cpu()
        return cls(index, float(grid[index]), float(grid[index + 1]), float(grid[1]))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: float, reduction: str = "mean") -> torch.Tensor:
    """``log N(sample; mean, std²)`` reduced over the non-batch elements: ``[B]`` fp32.

    ``sample`` is detached so the gradient flows only through ``mean``. Elementwise terms are
    formed first and then reduced, as in all three references.
    """
    diff = sample.detach() - mean
    per_element = -(diff * diff) / (2.0 * std * std) - math.log(std) - _HALF_LOG_2PI
    flat = per_element.reshape(per_element.shape[0], -1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)


def _same_shape(name: str, tensor: torch.Tensor, x: torch.Tensor) -> None:
    if tensor.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but x has {tuple(x.shape)}")


class SDESampler(Sampler):
    """A stochastic step ``x' = μ + std·ξ`` (ξ ~ N(0, I)) with the Gaussian log-prob of ``x'``.

    A noise form subclasses it and defines ``std(step)`` and ``mean(x, v, step)``; ``step`` does the
    rest: the grid and shape checks, the draw (or the given ``prev_sample``) and the log-prob.

    Args:
        noise_level: the form's noise scale (> 0; a noise level of 0 is the ODE).
        reduction: ``"mean"`` (the references' per-element average) or ``"sum"`` of the per-element
            Gaussian log-density over the non-batch elements.
    """

    stochastic = True

    def __init__(self, noise_level: float, reduction: str = "mean") -> None:
        if not noise_level > 0:  # also rejects NaN
            raise ValueError(
                f"noise_level must be > 0, got {noise_level} (a noise level of 0 is the ODE: use an ODE solver)"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown log-prob reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
        self.noise_level = float(noise_level)
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(noise_level={self.noise_level}, reduction={self.reduction!r})"

    @abstractmethod
    def std(self, step: GridStep) -> float:
        """The standard deviation of ``x'`` on ``step`` (0 where the form has no noise)."""

    @abstractmethod
    def mean(self, x: torch.Tensor, v: torch.Tensor, step: GridStep) -> torch.Tensor:
        """The mean μ ``[B, ...]`` fp32 of ``x'`` given ``x`` and ``v`` (fp32, ``[B, ...]``; gradients
        flow through ``v``)."""

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
        generator: torch.Generator | None = None,
    ) -> StepResult:
        """One SDE step from ``sigmas[index]`` to ``sigmas[index + 1]`` with its log-probability.

        Args:
            x: latents ``x_i`` ``[B, ...]`` (any float dtype; cast to fp32).
            v: velocity ``v ≈ ε − x0`` at ``(x, σ_i)`` ``[B, ...]`` (cast to fp32; gradients flow).
            sigmas: 1-D grid of T+1 values from 1 to 0.
            index: the step i, ``0 ≤ i < T``.
            history: unused (SDE steps are single-step; the rollout records x0 itself).
            prev_sample: a given ``x_{i+1}`` ``[B, ...]`` whose log-prob to evaluate (nothing is drawn).
            noise: the standard normal ``ξ`` ``[B, ...]`` to draw with (ignored when ``prev_sample`` is
                given); drawn with ``generator`` when omitted.
            generator: RNG for ``ξ`` when neither ``prev_sample`` nor ``noise`` is given.
        Returns:
            ``StepResult``: prev_sample and mean ``[B, ...]`` fp32, std a 0-d fp32 tensor, log_prob
            ``[B]`` fp32, x0 ``x − σ·v`` ``[B, ...]`` fp32.
        Raises:
            ValueError: index out of range, shape mismatch, or a step whose std is 0 (where the
                log-prob is undefined).
        """
        grid = GridStep.of(sigmas, index)
        _same_shape("v", v, x)
        std = self.std(grid)
        if not std > 0:
            raise ValueError(
                f"the {type(self).__name__} step {index} (σ {grid.sigma:.4g} → {grid.sigma_next:.4g}) has std 0: the "
                "log-prob is undefined at std 0; take this step (usually the last one, into σ = 0) as an ODE step"
            )
        x, v = x.float(), v.float()
        mean = self.mean(x, v, grid)
        if prev_sample is None:
            prev_sample = mean + std * self._noise(x, noise, generator)
        else:
            _same_shape("prev_sample", prev_sample, x)
            prev_sample = prev_sample.to(device=x.device, dtype=torch.float32)
        return StepResult(
            prev_sample=prev_sample,
            mean=mean,
            std=torch.tensor(std, dtype=torch.float32, device=x.device),
            log_prob=gaussian_log_prob(prev_sample, mean, std, self.reduction),
            x0=x - grid.sigma * v,
        )

    @staticmethod
    def _noise(x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """``ξ`` fp32 on ``x``'s device: the given ``noise``, or a draw with ``generator``."""
        if noise is None:
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        else:
            _same_shape("noise", noise, x)
        return noise.to(device=x.device, dtype=torch.float32)


class ReverseSDE(SDESampler):
    """Euler–Maruyama step of the marginal-preserving reverse SDE of rectified flow, with diffusion g.

    ``μ = x + dt·[v + g²/(2σ)·x̂1]`` (the score of ``x_σ`` is ``−x̂1/σ``, ``x̂1 = x + (1−σ)·v``) and
    ``std = g·√Δ``. A form defines ``diffusion(step)``, the g of the step.
    """

    @abstractmethod
    def diffusion(self, step: GridStep) -> float:
        """The diffusion coefficient g of ``step`` (> 0)."""

    def std(self, step: GridStep) -> float:
        return self.diffusion(step) * math.sqrt(max(step.delta, 0.0))

    def mean(self, x: torch.Tensor, v: torch.Tensor, step: GridStep) -> torch.Tensor:
        x1_hat = x + (1.0 - step.sigma) * v  # the noise estimate ε̂
        g = self.diffusion(step)
        dt = step.sigma_next - step.sigma
        # score correction of the marginal-preserving reverse SDE: −ε̂/σ is the score of x_σ
        return x + dt * (v + (g * g / (2.0 * step.sigma)) * x1_hat)


class FlowSDE(ReverseSDE):
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

    def __init__(self, noise_level: float = 0.7, reduction: str = "mean") -> None:
        super().__init__(noise_level, reduction)

    def diffusion(self, step: GridStep) -> float:
        """``g = a·sqrt(σ/(1−σ'))`` with ``σ' = σ_1`` at σ = 1 (else σ' = σ).

        The substitution avoids 1/0 at σ = 1 and, on the first step (Δ = 1 − σ_1), makes the per-step
        std ``g·√Δ`` exactly ``a``.
        """
        sigma_p = step.sigma_1 if step.sigma >= 1.0 else step.sigma
        return self.noise_level * math.sqrt(step.sigma / (1.0 - sigma_p))


class DanceSDE(ReverseSDE):
    """DanceGRPO SDE step: constant diffusion ``g = η``, so the per-step std is ``η·√Δ``.

    Args:
        noise_level (`float`, defaults to 0.3):
            The constant diffusion coefficient ``η`` (> 0). Paper defaults: 0.3 for images,
            0.25 for video.
        reduction (`"mean"` or `"sum"`, defaults to `"mean"`):
            How the per-element Gaussian log-density is reduced over non-batch elements (the
            reference uses the mean).
    """

    def __init__(self, noise_level: float = 0.3, reduction: str = "mean") -> None:
        super().__init__(noise_level, reduction)

    def diffusion(self, step: GridStep) -> float:
        return self.noise_level


class CPSSDE(SDESampler):
    """Coefficient-preserving sampling (newer FlowGRPO and MixGRPO code): std ``σ_{i+1}·sin(aπ/2)``.

    The std is 0 on a step into σ = 0, so the last step must be an ODE step (``step`` raises there, and
    ``supports_final_step = False`` lets the trainer refuse a schedule that samples it before anything loads).

    Args:
        noise_level (`float`, defaults to 0.8):
            The angle parameter ``a`` (> 0) of ``std = σ_{i+1}·sin(a·π/2)``; paper default 0.8.
        reduction (`"mean"` or `"sum"`, defaults to `"mean"`):
            How the per-element Gaussian log-density is reduced over non-batch elements.
    """

    supports_final_step = False  # std σ_{i+1}·sin(aπ/2) is 0 on the step into σ = 0

    def __init__(self, noise_level: float = 0.8, reduction: str = "mean") -> None:
        super().__init__(noise_level, reduction)

    def std(self, step: GridStep) -> float:
        return step.sigma_next * math.sin(self.noise_level * math.pi / 2.0)

    def mean(self, x: torch.Tensor, v: torch.Tensor, step: GridStep) -> torch.Tensor:
        x1_hat = x + (1.0 - step.sigma) * v
        x0_hat = x - step.sigma * v
        std = self.std(step)
        # max(…, 0) only guards rounding: std ≤ σ_{i+1} since |sin| ≤ 1.
        return (1.0 - step.sigma_next) * x0_hat + math.sqrt(max(step.sigma_next**2 - std**2, 0.0)) * x1_hat


#: The samplers by the name of their noise form (``sde_step``'s ``form``).
FORMS: dict[str, type[SDESampler]] = {"flow": FlowSDE, "dance": DanceSDE, "cps": CPSSDE}


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
    """``FORMS[form](noise_level, reduction).step(...)``: one SDE step as a function (tests, notebooks).

    ``form`` is ``"flow"``, ``"dance"`` or ``"cps"``; the other arguments are those of
    ``SDESampler.__init__`` and ``SDESampler.step``, whose errors it raises, and a ``ValueError`` for
    an unknown form.
    """
    if form not in FORMS:
        raise ValueError(f"unknown SDE form {form!r}; valid forms: {', '.join(FORMS)}")
    sampler = FORMS[form](noise_level, reduction)
    return sampler.step(x, v, sigmas, index, prev_sample=prev_sample, noise=noise, generator=generator)


@hookimpl
def register_samplers(register):
    register("sde.flow", FlowSDE)
    register("sde.dance", DanceSDE)
    register("sde.cps", CPSSDE)
