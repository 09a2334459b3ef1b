"""The five interfaces of mixgrpo. Plugins implement them; the core composes them.

Conventions (docs/algorithms.md §1): rectified flow ``x_σ = (1−σ)·x0 + σ·ε``; σ = 1 is noise, σ = 0 is
data; the backbone predicts the velocity ``v ≈ ε − x0``; step arithmetic is fp32.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mixgrpo.core.types import (
    Conditioning,
    ModelFacts,
    ReplaySpec,
    SolverHistory,
    StepPlan,
    StepResult,
)
from mixgrpo.core.validators import check_objective_factory as check_objective_factory


class Backbone(ABC):
    """A flow-matching text-to-image model: text → conditioning, (x, σ, cond) → velocity, x → images.

    Everything the core uses of a backbone is declared here, abstract or with a documented default,
    and nothing else is read (tests/core/test_contracts.py checks the core for it): the methods
    below, the trainable network ``module``, ``dtype``, ``lora_rank``, ``uses_source_images``, ``device``,
    ``calls_per_velocity``, the frozen reference, and what publishing a model needs
    (``model_facts``, ``export``, ``load_snippet``, ``pipeline_mu``, ``set_guidance``, ``pixel_multiple``).
    """

    #: the compute dtype of the network's forward (``velocity`` takes and returns fp32 whatever it
    #: is); the trainer's FSDP runs the all-gathered forward in it
    dtype: torch.dtype = torch.float32
    #: what trains: 0 = every weight of ``module`` (full fine-tuning); r > 0 = LoRA adapters of rank
    #: r (FSDP refuses those: LoRA runs use DDP)
    lora_rank: int = 0
    #: True: an editing backbone, whose prompts are ``EditPrompt`` items (instruction + source image); a
    #: class attribute, matched against the prompt set (train, ``mixgrpo sample``) before anything loads
    uses_source_images: bool = False
    _module: nn.Module | None = None

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
        """The parameters the policy optimizer updates (all, or only LoRA adapters), all of them
        parameters of ``module``."""

    @property
    def module(self) -> nn.Module:
        """The trainable network (an ``nn.Module``) that ``velocity`` runs; required: a backbone sets
        it in its constructor (``self.module = network``).

        The trainer may replace it by a wrapped version (DDP through accelerate) or shard it in
        place (FSDP), and switches it between ``train()`` and ``eval()``; a backbone therefore always
        calls ``self.module`` and never keeps another reference to it. Checkpoints hold its weights.
        """
        if self._module is None:
            raise NotImplementedError(f"{type(self).__name__} sets no module: a Backbone holds its trainable "
                                      "network in self.module")
        return self._module

    @module.setter
    def module(self, network: nn.Module) -> None:
        self._module = network

    def unwrapped(self) -> nn.Module:
        """``module`` without the wrappers the trainer may have put around it (DDP): the network whose
        parameter names checkpoints use."""
        module = self.module
        while hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        return module

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

    # -- publishing: the model card, ``mixgrpo export`` and ``mixgrpo sample`` --------------------
    def model_facts(self) -> ModelFacts:
        """What the model card, ``export`` and ``sample`` say about the model (see ``ModelFacts``).
        The default, ``ModelFacts()``: no diffusers pipeline, nothing else known."""
        return ModelFacts()

    def export(self, out: Path, *, max_shard_size: str | int = "5GB", load_path: str | None = None) -> dict[str, Any]:
        """Write the trained weights into the empty folder ``out`` as ``model_facts().pipeline`` loads
        them, and say what was written: a JSON-able dict with ``kind`` (``"lora"``: an adapter;
        ``"full"``: the whole trained network), ``pipeline``, ``load`` (one line: how to load the
        export from ``load_path``, the folder it is published as, default ``out``) and anything that
        describes the files. ``max_shard_size`` bounds each weight file of a full export. Only a
        backbone with a pipeline exports; the default raises ``ValueError``."""
        raise ValueError(f"backbone {type(self).__name__} names no diffusers pipeline to export for")

    def load_snippet(self, export_dir: str, prompt: str, num_steps: int) -> list[str]:
        """Markdown lines for the model card: how to load an export published as ``export_dir`` in
        diffusers and draw ``prompt`` in ``num_steps`` steps (a fenced Python block, with a sentence
        before it where one is needed). The default: no lines (no pipeline loads this backbone)."""
        return []

    @classmethod
    def pixel_multiple(cls, path: str) -> int | None:
        """What the image height and width must be a multiple of, read from the model folder ``path``
        without loading it (``mixgrpo sample`` refuses a bad ``--height`` with it); None: unknown."""
        return None

    def pipeline_mu(self, num_steps: int) -> float | None:
        """The ``mu`` of the dynamic σ grid (``TrainConfig.grid = 'dynamic'``) that the model's diffusers
        pipeline uses at this backbone's image size for ``num_steps`` steps (FLUX's: ``flux_mu`` of the
        image token count), or None where the pipeline's shift does not follow the image size (the
        default). ``mixgrpo sample --height/--width`` recomputes the grid's ``mu`` with it."""
        return None

    def set_guidance(self, scale: float) -> str:
        """Set the sampling guidance to ``scale`` as diffusers' ``guidance_scale`` means it (``mixgrpo
        sample --guidance``) and return the name of the setting changed, a key of
        ``model_facts().guidance_settings``. The default: no guidance setting, a ``ValueError``."""
        raise ValueError(f"backbone {type(self).__name__} has no guidance setting")


class TorchBackbone(Backbone):
    """A ``Backbone`` whose defaults come from its ``module``: the trainable parameters are those of
    ``module`` that require gradients, the device is theirs, and the frozen reference of
    ``reference()`` is a copy of the weights taken by ``freeze_reference`` (the trainer takes it
    before any update or resume). A backbone with a cheaper reference (its LoRA adapters switched
    off) overrides both.
    """

    _reference_module: nn.Module | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def freeze_reference(self) -> None:
        """Keep the current weights as the frozen reference of ``reference()`` (the trainer calls it
        before any update or resume, so the reference is the base model)."""
        if self._reference_module is None:
            self._reference_module = copy.deepcopy(self.unwrapped()).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
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


class PromptSet(ABC):
    """Prompts by split, called ``prompts(split, count, seed, iteration=None)`` (``register_prompt_sets``).
    A plain function is a prompt set too; a subclass of this one can declare what follows."""

    #: names of its parameters that change only the training draws (``iteration`` given), never the
    #: held-out prompts (a pool size): runs that differ only in them share the base model's evaluation
    training_only: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def __call__(self, split: str, count: int, seed: int, iteration: int | None = None) -> list[str]:
        """``count`` prompts of ``split`` (``"train"``/``"eval"``) of run ``seed``; training passes ``iteration``."""


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

    #: the reward's own label (runs, metrics and reports use its registered name instead)
    name: str = "reward"
    #: the direction training pushes the score; the core reads it directly, so a subclass that does
    #: not set it is trained upwards
    higher_is_better: bool = True
    #: True: an editing reward, called ``reward(images, prompts, sources=...)`` with each prompt's source
    #: image (``EditPrompt.image``) ``[B, 3, H, W]`` in [0, 1] at the images' size; False: as ever
    uses_source_images: bool = False

    @abstractmethod
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score images ``[B, 3, H, W]`` (float in [0, 1]) against ``B`` prompts → ``[B]`` float32."""


class Objective(ABC):
    """What every objective has: rewards → advantages, the ratio clip, the KL weight, the reward weights.
    An objective is a ``PolicyObjective`` (trains SDE transitions by their log-probs) or a
    ``MatchingObjective`` (trains the rollout's final samples with no log-probs).

    Constructor contract: every objective's constructor takes the keyword ``weights``, a mapping
    ``{reward name: weight}`` or None (equal weights), and keeps it as ``self.weights``; ``advantages``
    combines several rewards with these weights. The trainer builds the objective as
    ``create(TrainConfig.objective, weights=dict(TrainConfig.rewards))`` (gin binds the other
    arguments), so the weights are set where the rewards are chosen:
    ``TrainConfig.rewards = {'hpsv2': 1.0, 'pickscore': 0.5}``. ``check_objective_factory`` refuses a
    factory without ``weights`` before anything runs, and the contract mixins of ``mixgrpo.testing``
    check that the weights reach the advantages.
    """

    clip_range: float = 1e-4
    kl_beta: float = 0.0
    weights: Mapping[str, float] | None = None

    @abstractmethod
    def advantages(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor) -> torch.Tensor:
        """One advantage per sample ``[N]`` from named rewards ``{name: [N]}`` and group ids ``[N]``."""

    @property
    def uses_reference(self) -> bool:
        """Whether training runs the frozen reference model (for the KL term): ``kl_beta > 0``."""
        return self.kl_beta > 0

    def at_iteration(self, iteration: int) -> Objective:
        """The objective iteration ``iteration`` (0-based) trains with: ``self`` by default; one whose options
        end during training (BranchGRPO's ``prune_until``) returns itself without them from then on."""
        return self


class PolicyObjective(Objective):
    """Rewards → advantages; per-transition log-probs → the clipped policy loss (the constructor
    contract is ``Objective``'s)."""

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
            advantages: ``[M]`` each transition's advantage (``step_advantages``: by default the sample's).
            kl: ``[M]`` KL to the frozen reference, or ``None`` when ``kl_beta == 0``.
        Returns:
            ``(terms, stats)``: ``terms`` ``[M]`` with grad; the trainer sums them and divides by
            the number of (sample, trained step) pairs of the optimizer step, so the update averages
            over samples × trained steps. ``stats`` maps ``ratio``, ``clipped`` (0/1),
            ``approx_kl``, ``policy`` and ``kl`` to detached ``[M]`` tensors the trainer averages.
        """

    def step_advantages(self, rewards: dict, group_ids: torch.Tensor, edge_ids: torch.Tensor,
                        log_prob: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, K]`` per (sample, stored SDE step); rows with equal ``edge_ids`` ``[N, K]`` share a transition.
        NaN leaves that transition out of training (BranchGRPO's width pruning). ``log_prob`` ``[N, K]``: the
        rollout's log-probs of those transitions, passed only when ``advantages_use_log_probs``."""
        return self.advantages(rewards, group_ids)[:, None].repeat(1, edge_ids.shape[1])  # default: per sample

    @property
    def advantages_use_log_probs(self) -> bool:
        """Whether ``step_advantages`` weighs rewards by the rollout's log-probs (BranchGRPO's probability-
        weighted fusion): then the trainer passes them, gathered from every process."""
        return False

    def kl(self, policy: StepResult, reference: StepResult, sigmas: torch.Tensor, index: int) -> torch.Tensor:
        """The KL term ``[B]`` between the policy's and the frozen reference's Gaussians of step
        ``index`` (both the SDE sampler's results for the same ``x`` and ``prev_sample``). Called
        only when ``uses_reference``; an objective that sets ``kl_beta > 0`` must implement it."""
        raise NotImplementedError(f"{type(self).__name__} sets kl_beta > 0 but does not implement kl()")

    @property
    def uses_step_moments(self) -> bool:
        """Whether ``loss`` needs the step moments (GRPO-Guard): then the rollout keeps each SDE step's
        mean and the trainer calls ``loss(..., moments=StepMoments(mean_new, mean_old, std))``."""
        return False

    @property
    def replay(self) -> ReplaySpec | None:
        """Off-policy replay (OP-GRPO): a ``ReplaySpec`` makes the trainer keep a buffer of past trajectories
        and give one to each group whose prompt has one (``core/replay.py``); None (default): on-policy."""
        return None


class MatchingObjective(Objective):
    """A forward-process objective (DiffusionNFT, AWM): no log-probs and no SDE. The rollout walks the
    grid with ODE solvers only and records the final latents ``x0``; the trainer re-noises them at σ
    this objective draws, ``x_σ = (1−σ)·x0 + σ·ε``, and trains the velocity with the objective's
    reward-weighted flow-matching loss (docs/algorithms.md, "Forward-process objectives").

    Per iteration, for the N samples: ``draw_sigmas`` gives ``[K, N]`` σ values, the trainer draws the
    noise ε, computes the rollout policy's velocity ``v_old`` at every ``(x_σ, σ)`` before the first
    update (no grad), then, per minibatch, the current velocity ``v_new`` (with grad) and ``loss``.
    The first minibatch runs before any update, so ``v_new == v_old`` there: its ``ratio`` statistic
    must be 1, the same on-policy check as the GRPO objectives'.

    Constructor contract: ``Objective``'s (the keyword ``weights``). The trainer refuses, before any
    model loads, a schedule that makes any step an SDE step (the objective would ignore it) and
    shared initial noise within a group (an ODE walk from one noise gives one image G times).
    """

    @abstractmethod
    def draw_sigmas(self, grid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[K, N]`` fp32 noise levels in (0, 1] at which the N samples are trained this iteration
        (K draws each), from the rollout's σ grid ``grid`` ``[S+1]`` (descending, ending at 0)."""

    @abstractmethod
    def loss(
        self,
        v_new: torch.Tensor,
        v_old: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        advantages: torch.Tensor,
        v_ref: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample losses ``[B]`` (with grad) and per-sample statistics, at one σ draw.

        Args:
            v_new: ``[B, *latent]`` the current velocity at ``x_σ`` (with grad).
            v_old: ``[B, *latent]`` the rollout policy's velocity at the same input (no grad).
            x0: ``[B, *latent]`` the rollout's final latents; noise: ``[B, *latent]`` the ε of ``x_σ``.
            sigma: ``[B]`` the noise levels; advantages: ``[B]``.
            v_ref: ``[B, *latent]`` the frozen reference's velocity when ``uses_reference``, else None.
        Returns:
            ``(terms, stats)`` as ``PolicyObjective.loss``: the trainer sums the terms and divides by
            the number of (sample, σ draw) pairs of the optimizer step; ``stats`` maps ``ratio``,
            ``clipped``, ``approx_kl``, ``policy`` and ``kl`` to detached ``[B]`` tensors.
        """
