"""The five interfaces of mixgrpo. Plugins implement them; the core composes them.

Conventions (docs/algorithms.md §1): rectified flow ``x_σ = (1−σ)·x0 + σ·ε``; σ = 1 is noise, σ = 0 is
data; the backbone predicts the velocity ``v ≈ ε − x0``; step arithmetic is fp32.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import nn

from mixgrpo.core.types import Conditioning, SolverHistory, StepPlan, StepResult


class Backbone(ABC):
    """A flow-matching text-to-image model: text → conditioning, (x, σ, cond) → velocity, x → images."""

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Encode ``B`` prompts into a ``Conditioning`` with batch dimension ``B`` (no grad)."""

    @abstractmethod
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Predict the velocity ``v ≈ ε − x0``.

        Args:
            x: latents ``[B, *latent_shape]``, fp32 (cast to the model dtype inside).
            sigma: noise levels ``[B]`` in [0, 1], fp32 (exact σ; any quantization is internal).
            cond: conditioning with batch ``B``.
        Returns:
            ``[B, *latent_shape]`` fp32. Differentiable w.r.t. ``trainable_parameters()``.
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, *latent_shape]`` → images ``[B, 3, H, W]`` float in [0, 1] (no grad)."""

    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """The per-sample latent shape (without the batch dimension)."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the policy optimizer updates (all, or only LoRA adapters)."""

    def freeze_reference(self) -> None:  # noqa: B027 (optional hook: a no-op by default)
        """Fix the weights ``reference()`` uses to the current ones (called before any update).
        A backbone without a frozen reference has nothing to keep."""

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this context ``velocity`` uses the frozen base model (for the KL term)."""
        raise NotImplementedError(f"{type(self).__name__} does not provide a frozen reference for KL")
        yield  # pragma: no cover

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def calls_per_velocity(self) -> int:
        """Network evaluations per ``velocity`` call: 1, or 2 with classifier-free guidance (the
        conditional and the unconditional branch). The NFE metrics count network evaluations."""
        return 1


class TorchBackbone(Backbone):
    """A ``Backbone`` whose trainable network is ``self.module`` (an ``nn.Module``).

    The trainer may replace ``module`` by a wrapped version (DDP through accelerate) or shard it in
    place (FSDP); subclasses therefore always call ``self.module`` and never keep another reference
    to it. The frozen reference is the adapter-disabled network under peft, else a frozen copy of
    the weights taken by ``freeze_reference`` (the trainer takes it before any update or resume).
    """

    module: nn.Module
    _reference_module: nn.Module | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def unwrapped(self) -> nn.Module:
        module = self.module
        while hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        return module

    def freeze_reference(self) -> None:
        """Keep the current weights as the frozen reference of ``reference()`` (the trainer calls it
        before any update or resume, so the reference is the base model). Nothing to keep under
        peft, where the reference is the network with its adapters disabled."""
        base = self.unwrapped()
        if self._reference_module is None and not hasattr(base, "disable_adapter"):
            self._reference_module = copy.deepcopy(base).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        base = self.unwrapped()
        if hasattr(base, "disable_adapter"):  # peft: the base is the model with adapters off
            with base.disable_adapter():
                yield
            return
        self.freeze_reference()  # a direct caller that never froze one: the weights as they are now
        live = self.module
        self.module = self._reference_module
        try:
            yield
        finally:
            self.module = live


class Sampler(ABC):
    """One step of an ODE solver or an SDE sampler on the σ grid.

    Class attribute ``stochastic`` is True for SDE samplers (which return log-probs) and False for
    ODE solvers (which never do: a log-prob is undefined at g = 0). ``supports_final_step`` says
    whether the sampler can take the grid's last step, into σ = 0; an SDE sampler whose step has std
    0 there (CPS: std = σ_{i+1}·sin(aπ/2)) declares False, and the trainer then refuses, before any
    model loads, a schedule that would make that step an SDE step.
    """

    stochastic: ClassVar[bool] = False
    supports_final_step: ClassVar[bool] = True

    @abstractmethod
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
        """Advance ``x`` from ``sigmas[index]`` to ``sigmas[index + 1]``.

        Args:
            x: current latents ``[B, ...]`` (cast to fp32 inside).
            v: velocity at ``(x, sigmas[index])`` ``[B, ...]``.
            sigmas: the 1-D grid (fp32) the rollout walks, from 1 to 0.
            index: the step i.
            history: data estimates of earlier steps (multistep ODE solvers read it; the rollout
                appends to it after each step).
            prev_sample: SDE only: evaluate the log-prob of this given ``x_{i+1}`` instead of drawing.
            noise: SDE only: the standard normal ``ξ`` to use when drawing (same shape as ``x``).
        Returns:
            ``StepResult`` with fp32 tensors; ``log_prob`` ``[B]`` for SDE steps, ``None`` otherwise.
        """


class WindowSchedule(ABC):
    """Which steps are SDE and which are trained at iteration k: a pure function of (k, seed)."""

    @abstractmethod
    def plan(self, iteration: int, num_steps: int, num_samples: int = 1, seed: int = 0) -> StepPlan:
        """The ``StepPlan`` of iteration ``iteration`` (0-based) on a grid of ``num_steps`` steps.

        ``num_samples`` matters only to schedules that train a per-sample random subset; the
        subset of global sample n is the same on every process. ``seed`` is the run's seed: every
        random draw of a schedule comes from it (and the iteration), so two runs with different
        seeds draw differently and a resumed run draws what it would have drawn.
        """


class RewardUnavailable(RuntimeError):
    """Raised by a reward that cannot score anything and will not soon: a reward server unreachable
    for longer than the reward's patience. The run then stops at once, after checkpointing its last
    completed iteration, with this error's message (which names the underlying cause)."""


class Reward(ABC):
    """Images and prompts → one score per image.

    A sample the reward could not score is returned as NaN: it is then left out of the group
    statistics and gets advantage 0. A reward never turns a failure into a plausible score. A reward
    whose scorer is gone (a server down for longer than it waits) raises ``RewardUnavailable``; any
    other exception masks the call's samples like NaN scores.
    ``higher_is_better = False`` (a distance, a loss) makes training lower the score: the trainer
    negates its scores before the advantages; metrics and evaluations record them as returned.
    """

    name: str = "reward"
    higher_is_better: bool = True

    @abstractmethod
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score images ``[B, 3, H, W]`` (float in [0, 1]) against ``B`` prompts → ``[B]`` float32."""


class PolicyObjective(ABC):
    """Rewards → advantages; per-transition log-probs → the clipped policy loss."""

    clip_range: float = 1e-4
    kl_beta: float = 0.0

    @abstractmethod
    def advantages(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor) -> torch.Tensor:
        """One advantage per sample ``[N]`` from named rewards ``{name: [N]}`` and group ids ``[N]``."""

    @abstractmethod
    def loss(
        self,
        log_prob_new: torch.Tensor,
        log_prob_old: torch.Tensor,
        advantages: torch.Tensor,
        kl: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-transition losses ``[M]`` and per-transition statistics for ``M`` (sample, step) pairs.

        Args:
            log_prob_new: ``[M]`` recomputed log-probs (with grad).
            log_prob_old: ``[M]`` rollout log-probs (no grad).
            advantages: ``[M]`` the sample's advantage, repeated for each of its trained steps.
            kl: ``[M]`` KL to the frozen reference, or ``None`` when ``kl_beta == 0``.
        Returns:
            ``(terms, stats)``: ``terms`` ``[M]`` with grad; the trainer sums them and divides by
            the number of (sample, trained step) pairs of the optimizer step, so the update averages
            over samples × trained steps. ``stats`` maps ``ratio``, ``clipped`` (0/1),
            ``approx_kl``, ``policy`` and ``kl`` to detached ``[M]`` tensors the trainer averages.
        """

    def kl(self, policy: StepResult, reference: StepResult, sigmas: torch.Tensor, index: int) -> torch.Tensor:
        """The KL term ``[B]`` between the policy's and the frozen reference's Gaussians of step
        ``index`` (both the SDE sampler's results for the same ``x`` and ``prev_sample``). Called
        only when ``uses_reference``; an objective that sets ``kl_beta > 0`` must implement it."""
        raise NotImplementedError(f"{type(self).__name__} sets kl_beta > 0 but does not implement kl()")

    @property
    def uses_reference(self) -> bool:
        """Whether training runs the frozen reference model (for the KL term): ``kl_beta > 0``."""
        return self.kl_beta > 0
