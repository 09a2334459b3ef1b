"""Data types passed between the five interfaces.

All tensors named ``x`` / ``latents`` are in the backbone's latent layout ``[B, *latent_shape]``.
Step arithmetic is fp32 throughout; stored transitions are fp32 and reused bit-for-bit when
training recomputes log-probabilities (docs/algorithms.md §1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch


def _index_tensor(value: Any, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    return value


@attrs.define
class Conditioning:
    """Text conditioning produced by ``Backbone.encode``.

    Attributes:
        embeds: per-token text features ``[B, L, D]`` (float, the backbone's dtype).
        pooled: pooled text features ``[B, P]`` or ``None`` when the backbone has none.
        mask: attention mask ``[B, L]`` (bool) or ``None``.
        extra: backbone-specific tensors with a leading batch dimension (or scalars).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def select(self, index: torch.Tensor | Sequence[int]) -> Conditioning:
        """Rows ``index`` (1-D long tensor or list of ints) of every batched tensor."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Conditioning(
            embeds=_index_tensor(self.embeds, index),
            pooled=_index_tensor(self.pooled, index),
            mask=_index_tensor(self.mask, index),
            extra={k: _index_tensor(v, index) for k, v in self.extra.items()},
        )

    def to(self, device: torch.device | str) -> Conditioning:
        def move(v: Any) -> Any:
            return v.to(device) if isinstance(v, torch.Tensor) else v

        return Conditioning(
            embeds=move(self.embeds),
            pooled=move(self.pooled),
            mask=move(self.mask),
            extra={k: move(v) for k, v in self.extra.items()},
        )


@attrs.frozen
class ModelFacts:
    """What a backbone tells the model card, ``mixgrpo export`` and ``mixgrpo sample`` about its model
    (``Backbone.model_facts()``). Every field has a default, and ``ModelFacts()`` is the answer of a
    backbone outside diffusers (``toy``): no pipeline loads its exports, so ``export`` refuses it and
    the model card tells how to draw with ``mixgrpo sample`` instead.

    Attributes:
        pipeline: the name of the diffusers pipeline class that loads what ``Backbone.export`` writes
            (e.g. ``"StableDiffusion3Pipeline"``), or None.
        family: the model family, a tag of the model card (e.g. ``"sd3"``), or None.
        base_model: the base model the backbone was loaded from (a local folder or a Hub id), or None.
        height, width: the image size in pixels the backbone draws, or None.
        guidance: the pipeline's ``guidance_scale`` that draws what the backbone draws, or None where
            the pipeline takes none.
        guidance_settings: the backbone's guidance settings by name with their current values (what
            ``mixgrpo sample`` records in its manifest); empty when it has none.
        lora_alpha: the LoRA alpha when ``lora_rank > 0``, else None.
    """

    pipeline: str | None = None
    family: str | None = None
    base_model: str | None = None
    height: int | None = None
    width: int | None = None
    guidance: float | None = None
    guidance_settings: Mapping[str, float] = attrs.field(factory=dict)
    lora_alpha: float | None = None


@attrs.frozen
class StepMoments:
    """The step Gaussians' moments an objective may ask for (``PolicyObjective.uses_step_moments``;
    GRPO-Guard's regulated ratio), for M transitions.

    Attributes:
        mean_new: ``[M, ...]`` the current policy's step mean μ_new (with grad).
        mean_old: ``[M, ...]`` the rollout policy's step mean μ_old (no grad).
        std: the step std ``s = g·√Δ`` (``StepResult.std``): a float, or a tensor of M values or
            broadcastable to ``[M, 1, ...]``; > 0.
    """

    mean_new: torch.Tensor
    mean_old: torch.Tensor
    std: torch.Tensor | float


@attrs.define
class StepResult:
    """The outcome of one sampler step from ``sigmas[index]`` to ``sigmas[index + 1]``.

    Attributes:
        prev_sample: the next latent ``x_{i+1}`` ``[B, ...]`` (fp32). Named as in diffusers.
        mean: the step's mean ``μ`` ``[B, ...]`` (fp32); equals ``prev_sample`` for an ODE step.
        std: the per-step standard deviation ``g·√Δ``, broadcastable to ``x`` (fp32); 0 for ODE.
        log_prob: ``log p(prev_sample | x)`` ``[B]`` (fp32), reduced over non-batch elements, or
            ``None`` for a deterministic (ODE) step.
        x0: the data estimate ``x̂0 = x − σ·v`` ``[B, ...]`` (fp32), used by multistep solvers.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor | float
    log_prob: torch.Tensor | None = None
    x0: torch.Tensor | None = None

    @property
    def x_next(self) -> torch.Tensor:
        return self.prev_sample


@attrs.define
class SolverHistory:
    """Data estimates of the steps taken so far in one rollout (for multistep ODE solvers).

    ``entries`` holds ``(sigma, x0)`` pairs in step order, window steps included; the rollout
    appends one after every model call.
    """

    entries: list[tuple[float, torch.Tensor]] = attrs.field(factory=list)

    def append(self, sigma: float, x0: torch.Tensor) -> None:
        self.entries.append((float(sigma), x0))
        if len(self.entries) > 4:  # no solver here looks further back than 2M needs
            del self.entries[0]

    def last(self) -> tuple[float, torch.Tensor] | None:
        return self.entries[-1] if self.entries else None


@attrs.frozen
class StepPlan:
    """Which steps of a rollout are SDE steps and which are trained, for one iteration.

    Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]`` on the (uncompressed) grid of
    ``num_steps`` steps.

    Attributes:
        num_steps: T, the number of steps of the uncompressed grid.
        sde_steps: sorted step indices sampled with the SDE (log-prob recorded).
        train_steps: sorted step indices trained for every sample, or, when ``per_sample`` is
            True, a tuple with one sorted tuple per sample (DanceGRPO's random subset).
        window: ``(start, size)`` of the sliding window, or ``None`` for schedules without one.
        per_sample: whether ``train_steps`` differs per sample.
        branch_steps: sorted SDE steps at which every node of a group's tree splits into
            ``branch_factor`` children (BranchGRPO, ``core/tree.py``); ``()``: no tree.
        branch_factor: children per split (a group then holds ``branch_factor ** len(branch_steps)``
            samples, the tree's leaves).
        trunk_branches: k > 0 for a trunk rollout (TempFlow-GRPO, ``core/trunk.py``): each group's
            initial noise is walked once with the ODE, and at every SDE step j k samples leave it
            with one SDE step each, then the ODE to the end (a group then holds
            ``k * len(sde_steps)`` samples, each trained at its own branch step); 0: no trunk.
    """

    num_steps: int
    sde_steps: tuple[int, ...]
    train_steps: tuple[int, ...] | tuple[tuple[int, ...], ...]
    window: tuple[int, int] | None = None
    per_sample: bool = False
    branch_steps: tuple[int, ...] = ()
    branch_factor: int = 1
    trunk_branches: int = 0

    def __attrs_post_init__(self) -> None:
        sde = set(self.sde_steps)
        if self.trunk_branches and (self.branch_steps or not self.per_sample or not self.sde_steps):
            raise ValueError("a trunk plan (trunk_branches > 0) has SDE steps, trains one per sample (per_sample) "
                             f"and no tree; got sde_steps={self.sde_steps}, per_sample={self.per_sample}, "
                             f"branch_steps={self.branch_steps}")
        if any(not 0 <= i < self.num_steps for i in sde):
            raise ValueError(f"sde_steps {self.sde_steps} outside 0..{self.num_steps - 1}")
        if self.branch_steps and (self.branch_factor < 2 or not set(self.branch_steps) <= sde):
            raise ValueError(f"branch_steps {self.branch_steps} must be SDE steps (a split draws each child's noise; "
                             f"sde_steps={self.sde_steps}) with branch_factor >= 2, got {self.branch_factor}")
        rows = self.train_steps if self.per_sample else (self.train_steps,)
        for row in rows:
            missing = set(row) - sde
            if missing:
                raise ValueError(
                    f"train steps {sorted(missing)} are not SDE steps: a log-prob exists only on an "
                    f"SDE step (sde_steps={self.sde_steps})"
                )

    def train_steps_for(self, sample: int) -> tuple[int, ...]:
        return self.train_steps[sample] if self.per_sample else self.train_steps  # type: ignore[return-value]

    def all_train_steps(self) -> tuple[int, ...]:
        if not self.per_sample:
            return tuple(self.train_steps)  # type: ignore[arg-type]
        return tuple(sorted({i for row in self.train_steps for i in row}))  # type: ignore[union-attr]

    def train_mask(self, num_samples: int) -> torch.Tensor:
        """Bool ``[num_samples, num_steps]``: True where sample n trains step i."""
        mask = torch.zeros(num_samples, self.num_steps, dtype=torch.bool)
        for n in range(num_samples):
            mask[n, list(self.train_steps_for(n))] = True
        return mask

    @property
    def num_train_steps(self) -> float:
        """Trained steps per sample (mean over samples when per-sample)."""
        if not self.per_sample:
            return float(len(self.train_steps))
        return sum(len(r) for r in self.train_steps) / max(len(self.train_steps), 1)  # type: ignore[arg-type]


@attrs.frozen
class ReplaySpec:
    """What an off-policy objective asks of the trainer (``PolicyObjective.replay``; OP-GRPO): a buffer of
    past trajectories, one per prompt, of which a group whose prompt has one gets one in place of its last
    fresh sample (``core/replay.py`` says how they are drawn, weighted and kept).

    Attributes:
        truncate_step: τ ≥ 1: a replayed sample reuses its stored steps 0 … τ−1 (SDE steps of the plan) and
            the current policy walks on from the stored x_τ; the late steps, whose off-policy ratios are
            ill-conditioned, are always drawn anew.
        capacity: the most prompts the buffer holds (the entry stored longest ago leaves first).
        max_age: an entry stored more than ``max_age`` iterations ago is neither replayed nor kept.
        weight: the sequence-level importance weight of a replayed sample over its reused steps:
            ``"product"`` Π π_old/π_b (the exact correction) or ``"geometric"`` its τ-th root.
        max_weight: a cap on that weight, or None.
    """

    truncate_step: int
    capacity: int = 512
    max_age: int = 10
    weight: str = "product"
    max_weight: float | None = None

    def __attrs_post_init__(self) -> None:
        for name, value in (("truncate_step", self.truncate_step), ("capacity", self.capacity),
                            ("max_age", self.max_age)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReplaySpec.{name} must be an integer >= 1, got {value!r}")
        if self.weight not in ("product", "geometric"):
            raise ValueError(f"ReplaySpec.weight must be 'product' or 'geometric', got {self.weight!r}")
        if self.max_weight is not None and not self.max_weight >= 1.0:
            raise ValueError(f"ReplaySpec.max_weight must be >= 1 (a cap below 1 would shrink every replayed "
                             f"sample) or None, got {self.max_weight!r}")


@attrs.define
class Trajectories:
    """What a rollout returns: everything training needs, nothing it must recompute.

    Attributes:
        prompts: the N prompts (each group's prompt repeated G times).
        group_ids: ``[N]`` long, the group (prompt) of each sample, global across processes.
        sample_ids: ``[N]`` long, global sample indices (key the per-sample noise).
        sigmas: ``[S+1]`` fp32, the grid actually walked (compressed after the window for Flash).
        plan: the iteration's ``StepPlan`` (indices refer to the uncompressed grid, which equals
            ``sigmas`` up to the end of the window).
        sde_steps: the step indices stored below, in order (``plan.sde_steps``).
        x: ``[N, K, *latent]`` fp32, ``x_i`` at each stored SDE step (K = len(sde_steps)).
        x_next: ``[N, K, *latent]`` fp32, ``x_{i+1}`` drawn at each stored SDE step.
        log_prob: ``[N, K]`` fp32, the rollout's (old) log-probabilities.
        latents: ``[N, *latent]`` fp32, final latents at σ = 0.
        images: ``[N, 3, H, W]`` float in [0, 1].
        cond: the conditioning of the N samples (cached prompt embeddings).
        nfe: model calls per sample in this rollout (a mean: steps a group shares are paid once
            per group).
        seed: the rollout seed.
        shared_step: the SDE step whose input ``x`` is the same for every sample of a group (the
            first SDE step when the rollout shared the group's prefix), else ``None``; training
            computes the model once per group there.
        mean: ``[N, K, *latent]`` fp32, the rollout's step mean at each stored SDE step, when the
            objective asked for it (``PolicyObjective.uses_step_moments``), else ``None``.
        nodes: ``[N, K]`` long, a tree rollout's node of each row's input ``x`` at each stored step
            (rows with equal ids share it: one model row in training), named by the sample id of the
            node's first leaf; ``None`` without a tree (then ``shared_step`` says what is shared).
        edges: ``[N, K]`` long, a tree rollout's transition ``x_i → x_{i+1}`` of each row (the child
            node, named by its first leaf's sample id): rows with equal ids hold the same transition,
            trained once, by that first leaf; ``None``: every row's transitions are its own.
        weight: ``[N]`` fp32, each sample's importance weight (a replayed sample's, ``core/replay.py``):
            the trainer multiplies its advantages by it; ``None``: every sample's is 1.
    """

    prompts: list[str]
    group_ids: torch.Tensor
    sample_ids: torch.Tensor
    sigmas: torch.Tensor
    plan: StepPlan
    sde_steps: tuple[int, ...]
    x: torch.Tensor
    x_next: torch.Tensor
    log_prob: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor
    cond: Conditioning
    nfe: float
    seed: int
    shared_step: int | None = None
    mean: torch.Tensor | None = None
    nodes: torch.Tensor | None = None
    edges: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def slot(self, step: int) -> int:
        """Position of step index ``step`` in the stored K axis."""
        try:
            return self.sde_steps.index(step)
        except ValueError:
            raise KeyError(f"step {step} was not an SDE step of this rollout ({self.sde_steps})") from None

    def node_ids(self, step: int) -> torch.Tensor:
        """``[N]``: rows with equal ids share their input ``x`` at ``step`` (a tree's node; at the
        step a group shares, the group; elsewhere each sample its own)."""
        if self.nodes is not None:
            return self.nodes[:, self.slot(step)]
        return self.group_ids if step == self.shared_step else self.sample_ids

    @property
    def edge_ids(self) -> torch.Tensor:
        """``[N, K]``: rows with equal ids at a stored step hold the same transition (``edges``, or
        each row its own: its sample id)."""
        if self.edges is not None:
            return self.edges
        return self.sample_ids[:, None].repeat(1, len(self.sde_steps))

    def model_rows(self, step: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The samples the model runs on at ``step`` for the samples ``rows``, and the index that
        expands its output back to ``rows`` (``None``: one model row per sample). At the step a
        group shares, one sample per group; in a tree, one per node."""
        if self.nodes is None and step != self.shared_step:
            return rows, None
        _, first, expand = first_of_each(self.node_ids(step)[rows])
        return rows[first], expand

    def micro_batches(self, rows: torch.Tensor, mask: torch.Tensor, size: int) -> list[tuple[int, torch.Tensor]]:
        """``(step, sample rows)`` pairs for training ``rows`` (``mask[n, i]``: sample n trains step
        i): for each trained step, its samples in chunks of ``size``; at the step a group shares (one
        model call per group), chunks of ``size`` whole groups; in a tree, each transition once (by its
        first leaf) in chunks of ``size`` whole nodes."""
        chunks = []
        for step in self.plan.all_train_steps():
            members = rows[mask[rows, step]]
            if self.edges is not None:  # a transition several leaves share is trained once, by its first leaf
                members = members[self.edges[members, self.slot(step)] == self.sample_ids[members]]
            if not len(members):  # every transition of the step pruned
                continue
            if self.nodes is None and step != self.shared_step:
                chunks += [(step, part) for part in members.split(size)]
                continue
            groups, _, which = first_of_each(self.node_ids(step)[members])
            for part in torch.arange(len(groups)).split(size):
                chunks.append((step, members[torch.isin(which, part)]))
        return chunks


def first_of_each(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct values of ``keys`` in order of first appearance, the position of each one's first
    appearance, and for every entry the index of its value among the distinct ones."""
    first: dict[int, int] = {}
    for n, key in enumerate(keys.tolist()):
        first.setdefault(key, n)
    slot = {key: k for k, key in enumerate(first)}
    return (torch.tensor(list(first), dtype=torch.long), torch.tensor(list(first.values()), dtype=torch.long),
            torch.tensor([slot[key] for key in keys.tolist()], dtype=torch.long))


class EditPrompt(str):
    """An editing instruction (the string itself) carrying the path of its source image.

    Prompt sets for image editing return these; everything that passes prompts around keeps working
    because they are strings. Two items are equal only when both their text and their image are, and
    never equal a plain ``str``, so that the rollout's cache of encoded prompts (``dict.fromkeys``)
    keeps two edits of different images with the same instruction apart.

    Attributes:
        image: the source image's path, as given.
    """

    image: str

    def __new__(cls, instruction: str, image: str | os.PathLike[str]) -> EditPrompt:
        item = super().__new__(cls, instruction)
        item.image = os.fspath(image)
        return item

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return isinstance(other, EditPrompt) and str.__eq__(self, other) and self.image == other.image

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash((str(self), self.image))

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # str's own pickling would drop the image (it rebuilds from the characters alone)
        return (EditPrompt, (str(self), self.image))

    def __repr__(self) -> str:
        return f"EditPrompt({str(self)!r}, image={self.image!r})"

    def pixels(self, height: int, width: int) -> torch.Tensor:
        """The source image as RGB ``[3, height, width]`` float32 in [0, 1], resized with PIL's Lanczos
        filter (what diffusers' ``VaeImageProcessor.resize`` does to a PIL image); 8-bit levels / 255."""
        import numpy as np
        from PIL import Image

        with Image.open(self.image) as image:
            rgb = image.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), resample=Image.Resampling.LANCZOS)
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
