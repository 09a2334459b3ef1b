"""The rollout engine: walks the σ grid, SDE inside the plan's steps, ODE elsewhere.

For every step it asks the backbone for v once; steps in ``plan.sde_steps`` go to the SDE sampler
(log-prob recorded), the others to the ODE solver for before or after the window. With a
compression ratio (MixGRPO-Flash) the grid after the window is compressed; indices up to the end of
the window are those of the uncompressed grid, so training recomputes on identical σ values.

With shared initial noise, the samples of a group are one sample until the first SDE step adds
noise of its own: the ODE steps before it and its model call see identical inputs. ``share_prefix``
walks that common prefix once per group and hands each sample the group's state
(``_walk_shared_prefix``); the trajectories are those of the unshared walk up to float rounding
(the same values, computed in a batch of other rows), and the MixGRPO window at step l costs
l + 1 model calls per group instead of per sample.

Noise is keyed, never drawn from a global stream: the initial noise by (seed, iteration, group) when
shared within a group (DanceGRPO/MixGRPO) or by (seed, iteration, sample) otherwise, and the SDE
noise by (seed, iteration, sample, step). A sample therefore gets the same noise whatever the batch
size, the number of processes, or the order in which it is drawn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from mixgrpo.core.interfaces import Backbone, Sampler
from mixgrpo.core.progress import progress_bar
from mixgrpo.core.sigmas import compressed_grid, sigma_grid
from mixgrpo.core.types import Conditioning, SolverHistory, StepPlan, Trajectories, first_of_each


def keyed_generator(*key: int | str) -> torch.Generator:
    """A CPU generator seeded from a stable hash of ``key`` (independent of Python's hash seed)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def keyed_normal(shape: Sequence[int], *key: int | str) -> torch.Tensor:
    """Standard normal noise of ``shape`` (fp32, CPU) determined by ``key`` alone."""
    return torch.randn(tuple(shape), generator=keyed_generator(*key), dtype=torch.float32)


@attrs.define
class SamplingSetup:
    """How a rollout walks the grid.

    Attributes:
        num_steps: T of the uncompressed grid.
        shift: static shift s (3 for FLUX and SD3.5 training).
        grid: σ grid kind (``static`` | ``dynamic`` | ``diffusers``, see ``sigma_grid``).
        mu: dynamic-shift parameter for ``grid="dynamic"``.
        shift_terminal: stretch the grid so its last nonzero σ is this value (``sigma_grid``), or None.
        compression: Flash ratio r for the post-window ODE steps, or ``None`` (no compression).
        shared_noise: give all samples of a group the same initial noise.
        share_prefix: with shared noise, walk the steps a group's samples share (the ODE steps
            before the first SDE step and that step's model call) once per group.
    """

    num_steps: int = 25
    shift: float = 3.0
    grid: str = "static"
    mu: float | None = None
    shift_terminal: float | None = None
    compression: float | None = None
    shared_noise: bool = True
    share_prefix: bool = True

    def sigmas(self, plan: StepPlan | None = None) -> torch.Tensor:
        if self.compression is not None and plan is not None and plan.window is not None:
            if self.grid != "static" or self.shift_terminal is not None:
                raise ValueError("Flash compression is defined on the static grid; set grid='static' and "
                                 "shift_terminal=None")
            return compressed_grid(self.num_steps, self.shift, plan.window, self.compression)
        return sigma_grid(self.num_steps, self.shift, kind=self.grid, mu=self.mu, shift_terminal=self.shift_terminal)


def initial_noise(shape: Sequence[int], group_ids: torch.Tensor, sample_ids: torch.Tensor,
                  seed: int, iteration: int, shared: bool) -> torch.Tensor:
    """``x_T`` ``[N, *shape]``: keyed by group when ``shared`` (same for a group), else by sample."""
    keys = group_ids if shared else sample_ids
    tag = "group" if shared else "sample"
    return torch.stack([keyed_normal(shape, seed, iteration, tag, int(k)) for k in keys])


def step_noise(shape: Sequence[int], sample_ids: torch.Tensor, seed: int, iteration: int, step: int) -> torch.Tensor:
    """SDE noise ``ξ`` ``[N, *shape]`` for step ``step``, keyed by (seed, iteration, sample, step)."""
    return torch.stack([keyed_normal(shape, seed, iteration, "sde", int(n), step) for n in sample_ids])


def encode_unique(backbone: Backbone, prompts: Sequence[str]) -> Conditioning:
    """Encode each distinct prompt once and expand to ``len(prompts)`` rows (cached embeddings)."""
    unique = list(dict.fromkeys(prompts))
    cond = backbone.encode(unique)
    where = {p: k for k, p in enumerate(unique)}
    return cond.select([where[p] for p in prompts])


def batched_velocity(backbone: Backbone, x: torch.Tensor, sigma: float, cond: Conditioning,
                     batch_size: int, bar: Any = None) -> torch.Tensor:
    """``backbone.velocity`` over ``x`` in chunks of ``batch_size`` (no grad), fp32 ``[N, ...]``;
    ``bar`` (a tqdm bar, optional) advances by one per chunk."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        rows = torch.arange(start, min(start + batch_size, x.shape[0]))
        xb = x[rows]
        sig = torch.full((xb.shape[0],), sigma, dtype=torch.float32, device=xb.device)
        out.append(backbone.velocity(xb, sig, cond.select(rows)).float())
        if bar is not None:
            bar.update(1)
    return torch.cat(out)


@torch.no_grad()
def rollout(
    backbone: Backbone,
    prompts: Sequence[str],
    group_ids: torch.Tensor,
    sample_ids: torch.Tensor,
    plan: StepPlan,
    *,
    setup: SamplingSetup,
    sde_sampler: Sampler,
    pre_solver: Sampler,
    post_solver: Sampler,
    seed: int,
    iteration: int,
    batch_size: int = 16,
    on_images: Callable[[torch.Tensor, slice], None] | None = None,
    keep_means: bool = False,
) -> Trajectories:
    """Sample ``len(prompts)`` trajectories under ``plan``, ``batch_size`` samples at a time.

    Each chunk of ``batch_size`` samples walks the whole grid and is decoded before the next one
    starts, so its images exist while the next chunk rolls out (``on_images`` receives them: the
    trainer scores them meanwhile). A sample's trajectory depends only on its noise keys and on the
    chunk it is evaluated in, never on the order of the chunks.

    Args:
        backbone: the policy.
        prompts: N prompts (each group's prompt repeated G times).
        group_ids: ``[N]`` global group ids; sample_ids: ``[N]`` global sample ids (noise keys).
        plan: which steps are SDE (``plan.sde_steps``); ``plan.num_steps`` must equal setup.num_steps.
        setup: grid and noise options.
        sde_sampler: stochastic sampler used on ``plan.sde_steps``.
        pre_solver / post_solver: ODE solvers before / after the window (``post_solver`` is also
            used for non-SDE steps of window-less plans).
        seed, iteration: noise keys.
        batch_size: samples per model call (and per chunk).
        on_images: called with each chunk's images ``[B, 3, H, W]`` and its rows of the N samples,
            as soon as they are decoded.
        keep_means: also store each SDE step's mean (``Trajectories.mean``), for an objective that
            asks for the step moments.
    Returns:
        ``Trajectories`` with fp32 transitions of every SDE step.
    """
    if plan.num_steps != setup.num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps but the sampling setup has {setup.num_steps}")
    if not sde_sampler.stochastic:
        raise ValueError(f"{type(sde_sampler).__name__} is an ODE solver; the SDE sampler must be stochastic")
    n = len(prompts)
    group_ids = torch.as_tensor(group_ids, dtype=torch.long)
    sample_ids = torch.as_tensor(sample_ids, dtype=torch.long)
    if group_ids.shape != (n,) or sample_ids.shape != (n,):
        raise ValueError(f"group_ids and sample_ids must have shape [{n}]")
    if plan.branch_steps:  # each group a tree of samples, every node walked once (BranchGRPO)
        from mixgrpo.core.tree import tree_rollout  # tree.py builds on this module's helpers

        return tree_rollout(backbone, prompts, group_ids, sample_ids, plan, setup=setup, sde_sampler=sde_sampler,
                            pre_solver=pre_solver, post_solver=post_solver, seed=seed, iteration=iteration,
                            batch_size=batch_size, on_images=on_images, keep_means=keep_means)
    if plan.trunk_branches:  # each group an ODE trunk with samples branching off it (TempFlow-GRPO)
        from mixgrpo.core.trunk import trunk_rollout  # trunk.py builds on this module's helpers

        return trunk_rollout(backbone, prompts, group_ids, sample_ids, plan, setup=setup, sde_sampler=sde_sampler,
                             post_solver=post_solver, seed=seed, iteration=iteration, batch_size=batch_size,
                             on_images=on_images, keep_means=keep_means)
    cond = encode_unique(backbone, prompts)  # once per distinct prompt
    sigmas = setup.sigmas(plan)
    steps = tuple(i for i in sorted(set(plan.sde_steps)) if i < plan.num_steps)
    solvers = _solver_per_step(sigmas.numel() - 1, plan, steps, pre_solver, post_solver)
    shape = backbone.latent_shape()
    x_T = initial_noise(shape, group_ids, sample_ids, seed, iteration, setup.shared_noise)
    prefix = None
    if setup.shared_noise and setup.share_prefix:
        _check_groups_share_prompts(prompts, group_ids)
        prefix = _walk_shared_prefix(backbone, x_T, cond, group_ids, sigmas, solvers, batch_size)
    parts = []
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        begin = prefix.expand(group_ids[rows]) if prefix is not None else _ChunkStart(x_T[rows])
        part = _rollout_chunk(backbone, begin, cond.select(torch.arange(n)[rows]), sample_ids[rows],
                              sigmas, solvers, sde_sampler, seed, iteration, keep_means)
        images = backbone.decode(part.latents).float()
        if on_images is not None:
            on_images(images, rows)
        parts.append((part.x, part.x_next, part.log_prob, part.latents, images, part.mean))
    columns = list(zip(*parts, strict=True))
    xs, x_nexts, log_probs, latents, images = (torch.cat(column) for column in columns[:5])
    means = torch.cat(columns[5]) if keep_means else None
    calls = sigmas.numel() - 1
    if prefix is not None and n:  # the shared steps were paid once per group
        calls -= prefix.calls * (1 - prefix.groups / n)
    return Trajectories(
        prompts=list(prompts),
        group_ids=group_ids,
        sample_ids=sample_ids,
        sigmas=sigmas,
        plan=plan,
        sde_steps=steps,
        x=xs,
        x_next=x_nexts,
        log_prob=log_probs,
        latents=latents,
        images=images,
        cond=cond,
        nfe=calls * backbone.calls_per_velocity,
        seed=seed,
        shared_step=prefix.step if prefix is not None and steps else None,
        mean=means,
    )


def _solver_per_step(num_calls: int, plan: StepPlan, sde_steps: tuple[int, ...], pre_solver: Sampler,
                     post_solver: Sampler) -> list[Sampler | None]:
    """The ODE solver of each step of the walked grid, ``None`` for the SDE steps."""
    start = plan.window[0] if plan.window is not None else None
    sde = set(sde_steps)
    return [None if i in sde else pre_solver if start is not None and i < start else post_solver
            for i in range(num_calls)]


@attrs.frozen
class _ChunkStart:
    """Where a chunk starts its walk: latents ``x`` at step ``step``, the model's velocity there when
    already computed (``v``), and the solver history of the steps before."""

    x: torch.Tensor
    step: int = 0
    v: torch.Tensor | None = None
    history: tuple[tuple[float, torch.Tensor], ...] = ()


@attrs.frozen
class _SharedPrefix:
    """Each group's walk of the steps its samples share, one row per group (``row[group id]``):
    ``x`` at ``step`` (the first SDE step, or the end of a grid without one), the velocity at it
    (``None`` at the end), and the solver history so far."""

    row: dict[int, int]
    step: int
    x: torch.Tensor
    v: torch.Tensor | None
    history: tuple[tuple[float, torch.Tensor], ...]

    @property
    def groups(self) -> int:
        return len(self.row)

    @property
    def calls(self) -> int:
        """Model calls a group pays once: the steps before ``step`` and ``step``'s own."""
        return self.step + (self.v is not None)

    def expand(self, group_ids: torch.Tensor) -> _ChunkStart:
        """The start of a chunk whose samples belong to ``group_ids``."""
        index = torch.tensor([self.row[int(g)] for g in group_ids], device=self.x.device)
        return _ChunkStart(x=self.x[index], step=self.step, v=None if self.v is None else self.v[index],
                           history=tuple((sigma, x0[index]) for sigma, x0 in self.history))


def _check_groups_share_prompts(prompts: Sequence[str], group_ids: torch.Tensor) -> None:
    seen: dict[int, str] = {}
    for prompt, group in zip(prompts, group_ids.tolist(), strict=True):
        if seen.setdefault(group, prompt) != prompt:
            raise ValueError(f"group {group} holds two prompts ({seen[group]!r} and {prompt!r}); with shared "
                             "initial noise a group is one prompt's samples (set shared_noise=False otherwise)")


def _walk_shared_prefix(backbone: Backbone, x_T: torch.Tensor, cond: Conditioning, group_ids: torch.Tensor,
                        sigmas: torch.Tensor, solvers: list[Sampler | None], batch_size: int) -> _SharedPrefix:
    """Walk every group's first sample from ``x_T`` up to the first SDE step and compute the model's
    velocity there, ``batch_size`` groups per model call: the part of the grid in which a group's
    samples (same initial noise, same prompt) are one."""
    device = backbone.device
    end = next((i for i, solver in enumerate(solvers) if solver is None), len(solvers))
    groups, reps, _ = first_of_each(group_ids)
    xs, vs, histories = [], [], []
    for start in range(0, len(reps), batch_size):
        rows = reps[start:start + batch_size]
        x, c = x_T[rows].to(device), cond.select(rows)
        history = SolverHistory()
        for i in range(end):
            v = backbone.velocity(x, torch.full((x.shape[0],), float(sigmas[i]), device=device), c).float()
            x = _ode_step(solvers[i], x, v, sigmas, i, history)
        xs.append(x)
        if end < len(solvers):
            vs.append(backbone.velocity(x, torch.full((x.shape[0],), float(sigmas[end]), device=device), c).float())
        histories.append(history.entries)
    history = tuple((entries[0][0], torch.cat([h[k][1] for h in histories]))
                    for k, entries in enumerate(zip(*histories, strict=True)))
    return _SharedPrefix(row={g: k for k, g in enumerate(groups.tolist())}, step=end, x=torch.cat(xs),
                         v=torch.cat(vs) if vs else None, history=history)


def _ode_step(solver: Sampler, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: int,
              history: SolverHistory) -> torch.Tensor:
    """One ODE step of ``solver``: records the step's data estimate in ``history``, returns x_{i+1}."""
    res = solver.step(x, v, sigmas, i, history=history)
    _record(history, res, x, v, sigmas, i)
    return res.prev_sample


def _record(history: SolverHistory, res: Any, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: int) -> None:
    """Append step i's data estimate (the sampler's, else x − σ_i·v) to the solver history."""
    history.append(float(sigmas[i]), res.x0 if res.x0 is not None else x.float() - float(sigmas[i]) * v)


@attrs.define
class _Chunk:
    """A chunk's stored transitions ``x``, ``x_next`` ``[B, K, *latent]`` and log-probs ``[B, K]``
    (CPU, fp32), and its final latents (fp32, on the backbone's device)."""

    x: torch.Tensor
    x_next: torch.Tensor
    log_prob: torch.Tensor
    latents: torch.Tensor
    mean: torch.Tensor | None = None


def _rollout_chunk(backbone: Backbone, begin: _ChunkStart, cond: Conditioning, sample_ids: torch.Tensor,
                   sigmas: torch.Tensor, solvers: list[Sampler | None], sde_sampler: Sampler, seed: int,
                   iteration: int, keep_means: bool = False) -> _Chunk:
    """One chunk down the grid from ``begin`` in one model call per step (``keep_means``: also the
    SDE steps' means)."""
    device, shape = backbone.device, backbone.latent_shape()
    x = begin.x.to(device)
    history = SolverHistory(list(begin.history))
    xs, x_nexts, log_probs, means = [], [], [], []
    for i in range(begin.step, len(solvers)):
        solver = solvers[i]
        if i == begin.step and begin.v is not None:
            v = begin.v
        else:
            sig = torch.full((x.shape[0],), float(sigmas[i]), dtype=torch.float32, device=device)
            v = backbone.velocity(x, sig, cond).float()
        if solver is None:
            noise = step_noise(shape, sample_ids, seed, iteration, i).to(device)
            res = sde_sampler.step(x, v, sigmas, i, history=history, noise=noise)
            xs.append(x.float().cpu())
            x_nexts.append(res.prev_sample.float().cpu())
            log_probs.append(res.log_prob.float().cpu())
            if keep_means:
                means.append(res.mean.float().cpu())
            _record(history, res, x, v, sigmas, i)
            x = res.prev_sample
        else:
            x = _ode_step(solver, x, v, sigmas, i, history)
    b = x.shape[0]
    if not xs:
        empty = torch.zeros(b, 0, *shape)
        return _Chunk(empty, empty, torch.zeros(b, 0), x.float(), empty if keep_means else None)
    return _Chunk(torch.stack(xs, 1), torch.stack(x_nexts, 1), torch.stack(log_probs, 1), x.float(),
                  torch.stack(means, 1) if keep_means else None)


@torch.no_grad()
def sample_ode(backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int], *, setup: SamplingSetup,
               solver: Sampler, batch_size: int = 16, indices: Sequence[int] | None = None,
               progress: str | None = None) -> torch.Tensor:
    """Deterministic ODE sampling for evaluation and sample grids: images ``[N, 3, H, W]``.

    The initial noise of prompt n is keyed by ``(seeds[n], "eval", indices[n])`` (``indices``
    defaults to 0..N−1), so the same (prompt, seed) pair always starts from the same noise, before
    and after training, however the prompts are split into calls. ``progress``: a description for
    a progress bar over the model calls (none when None); the bar is removed when done, so it can
    sit under another one.
    """
    cond = encode_unique(backbone, prompts)
    shape = backbone.latent_shape()
    keys = range(len(seeds)) if indices is None else indices
    x = torch.stack([keyed_normal(shape, int(s), "eval", int(n)) for n, s in zip(keys, seeds, strict=True)])
    x = x.to(backbone.device)
    sigmas = setup.sigmas(None)
    history = SolverHistory()
    calls = (sigmas.numel() - 1) * -(-x.shape[0] // batch_size)
    bar = progress_bar(total=calls, desc=progress, unit="call", leave=False, disable=progress is None)
    for i in range(sigmas.numel() - 1):
        v = batched_velocity(backbone, x, float(sigmas[i]), cond, batch_size, bar=bar)
        x = _ode_step(solver, x, v, sigmas, i, history)
    bar.close()
    return backbone.decode(x).float()
