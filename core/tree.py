"""Tree rollouts (BranchGRPO, docs/algorithms.md "Tree rollouts"): a group is a tree whose leaves
are its samples.

A group's G samples start from the group's initial noise as one node. At each of the plan's
``branch_steps`` every node splits into ``branch_factor`` = b children, so after s splits a group
holds b^s nodes and after all S of them its G = b^S leaves. Every node is walked once: the model runs
once per node and step (never per leaf), and at a split the children share their parent's input and
velocity and differ only by their SDE noise.

Leaves are the group's rows in order; a node is the run of consecutive leaves below it, so after s
splits leaf j of a group sits in node ⌊j / (G / b^s)⌋. A node is named by the global sample id of
its first leaf; its SDE noise at step i is keyed by that id, ``(seed, iteration, id, i)``, as a
sample's is in the flat rollout, so a leaf's trajectory is that of a single-sample walk that draws,
at each step, the noise of the node it is in after the step.

Per leaf and stored SDE step, ``Trajectories.nodes`` names the node of the input ``x_i`` (rows that
share it share a model row in training) and ``Trajectories.edges`` the transition's child node (rows
that share it hold the same transition, trained once, by its first leaf).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mixgrpo.core.interfaces import Backbone, MatchingObjective, PolicyObjective, Sampler
from mixgrpo.core.rollout import (
    SamplingSetup,
    _ode_step,
    _record,
    _solver_per_step,
    batched_velocity,
    encode_unique,
    initial_noise,
    step_noise,
)
from mixgrpo.core.types import Conditioning, SolverHistory, StepPlan, Trajectories, first_of_each


def leaves_per_group(plan: StepPlan) -> int:
    """G = b^S, the leaves of one tree."""
    return plan.branch_factor ** len(plan.branch_steps)


def level_ids(plan: StepPlan, group_ids: torch.Tensor, sample_ids: torch.Tensor, splits: int) -> torch.Tensor:
    """``[N]``: the node of each row after ``splits`` splits, named by its first leaf's sample id.

    Rows are the leaves, each group's G rows consecutive and in leaf order (checked)."""
    size = leaves_per_group(plan)
    groups, first, which = first_of_each(group_ids)
    counts = torch.bincount(which, minlength=len(groups))
    starts = torch.arange(len(group_ids)) - first[which]
    if bool((counts != size).any()) or not torch.equal(first[which] + starts, torch.arange(len(group_ids))):
        raise ValueError(f"a tree rollout needs each group's samples as {size} consecutive rows "
                         f"(branch_factor ** len(branch_steps)); got group sizes {counts.tolist()}")
    width = size // plan.branch_factor ** splits  # leaves below one node after `splits` splits
    return sample_ids[first[which] + starts // width * width]


@torch.no_grad()
def tree_rollout(backbone: Backbone, prompts: Sequence[str], group_ids: torch.Tensor, sample_ids: torch.Tensor,
                 plan: StepPlan, *, setup: SamplingSetup, sde_sampler: Sampler, pre_solver: Sampler,
                 post_solver: Sampler, seed: int, iteration: int, batch_size: int = 16,
                 on_images: Callable[[torch.Tensor, slice], None] | None = None,
                 keep_means: bool = False) -> Trajectories:
    """The rollout of a branching plan: ``core.rollout.rollout``'s arguments and result, each node of
    every group's tree walked once (model calls in batches of ``batch_size`` nodes), the leaves decoded
    in chunks of ``batch_size`` (``on_images`` receives each chunk)."""
    if not setup.shared_noise:
        raise ValueError("a tree rollout starts each group from one initial noise: set TrainConfig.shared_noise = True")
    n = len(prompts)
    cond = encode_unique(backbone, prompts)
    sigmas = setup.sigmas(plan)
    steps = tuple(sorted(plan.sde_steps))
    solvers = _solver_per_step(sigmas.numel() - 1, plan, steps, pre_solver, post_solver)
    levels = [level_ids(plan, group_ids, sample_ids, s) for s in range(len(plan.branch_steps) + 1)]
    walk = _TreeWalk(backbone, cond, levels, initial_noise(backbone.latent_shape(), group_ids, sample_ids, seed,
                                                           iteration, True), batch_size)
    for i, solver in enumerate(solvers):
        walk.step(i, sigmas, solver, sde_sampler, i in plan.branch_steps, seed, iteration, keep_means)
    latents = walk.leaves()
    images = []
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        images.append(backbone.decode(latents[rows]).float())
        if on_images is not None:
            on_images(images[-1], rows)
    stored = walk.stored(n, backbone.latent_shape())
    return Trajectories(prompts=list(prompts), group_ids=group_ids, sample_ids=sample_ids, sigmas=sigmas, plan=plan,
                        sde_steps=steps, x=stored["x"], x_next=stored["x_next"], log_prob=stored["log_prob"],
                        latents=latents, images=torch.cat(images) if images else latents.new_zeros(0, 3, 1, 1),
                        cond=cond, nfe=walk.calls / max(n, 1) * backbone.calls_per_velocity, seed=seed,
                        mean=stored["mean"] if keep_means else None, nodes=stored["nodes"], edges=stored["edges"])


class _TreeWalk:
    """The state of every group's tree at one level: one row per node (latents, solver history), and
    what the SDE steps stored, per leaf."""

    def __init__(self, backbone: Backbone, cond: Conditioning, levels: list[torch.Tensor], x_T: torch.Tensor,
                 batch_size: int) -> None:
        self.backbone, self.cond, self.levels, self.batch_size = backbone, cond, levels, batch_size
        self.splits = 0
        _, self.reps, self.which = first_of_each(levels[0])  # node rows (first leaves), leaf → node
        self.x = x_T[self.reps].to(backbone.device)
        self.history = SolverHistory()
        self.calls = 0  # model rows, summed over steps
        self.columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "x_next", "log_prob", "mean", "nodes",
                                                                        "edges")}

    def step(self, i: int, sigmas: torch.Tensor, solver: Sampler | None, sde_sampler: Sampler, split: bool,
             seed: int, iteration: int, keep_means: bool) -> None:
        """Step ``i`` for every node: one model row each; at a split the children take their
        parent's input, velocity and history, then each draws its own noise."""
        v = batched_velocity(self.backbone, self.x, float(sigmas[i]), self.cond.select(self.reps), self.batch_size)
        self.calls += len(self.reps)
        parent = self.levels[self.splits]
        if split:
            self._split()
            v = v[self.parent_index]
        if solver is not None:
            self.x = _ode_step(solver, self.x, v, sigmas, i, self.history)
            return
        ids = self.levels[self.splits][self.reps]
        noise = step_noise(self.backbone.latent_shape(), ids, seed, iteration, i).to(self.x.device)
        res = sde_sampler.step(self.x, v, sigmas, i, history=self.history, noise=noise)
        for key, value in (("x", self.x), ("x_next", res.prev_sample), ("log_prob", res.log_prob),
                           ("mean", res.mean if keep_means else None)):
            if value is not None:
                self.columns[key].append(value.float().cpu()[self.which])
        self.columns["nodes"].append(parent.clone())
        self.columns["edges"].append(self.levels[self.splits].clone())
        _record(self.history, res, self.x, v, sigmas, i)
        self.x = res.prev_sample

    def _split(self) -> None:
        """Go one level down: every node's row is repeated for its children (a child's first leaf lies
        in its parent's node, so the parent is that leaf's node one level up)."""
        parent_of_leaf = self.which
        self.splits += 1
        _, self.reps, self.which = first_of_each(self.levels[self.splits])
        self.parent_index = parent_of_leaf[self.reps].to(self.x.device)
        self.x = self.x[self.parent_index]
        self.history = SolverHistory([(s, x0[self.parent_index]) for s, x0 in self.history.entries])

    def leaves(self) -> torch.Tensor:
        """``[N, *latent]`` fp32: each leaf's final latents (its node's, once every split is done)."""
        return self.x.float()[self.which.to(self.x.device)]

    def stored(self, n: int, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        """The stored columns stacked per leaf: ``[N, K, ...]`` (an empty K axis without SDE steps)."""
        empty = {"x": torch.zeros(n, 0, *shape), "x_next": torch.zeros(n, 0, *shape), "mean": torch.zeros(n, 0, *shape),
                 "log_prob": torch.zeros(n, 0), "nodes": torch.zeros(n, 0, dtype=torch.long),
                 "edges": torch.zeros(n, 0, dtype=torch.long)}
        return {k: torch.stack(col, 1) if col else empty[k] for k, col in self.columns.items()}


def advantages(objective: PolicyObjective | MatchingObjective, rewards: dict[str, torch.Tensor],
               group_ids: torch.Tensor, edge_ids: torch.Tensor,
               log_prob: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """The trainer's advantages: ``[N, K]`` per (sample, stored step) from a ``PolicyObjective``
    (``step_advantages``, which a tree's objective makes per node; with the rollout's log-probs, which
    ``log_prob()`` gathers, when it asks for them), ``[N]`` from a ``MatchingObjective`` (it trains final
    samples, not transitions)."""
    if isinstance(objective, MatchingObjective):
        return objective.advantages(rewards, group_ids)
    if objective.advantages_use_log_probs:
        if log_prob is None:
            raise ValueError(f"{type(objective).__name__} weighs rewards by the rollout's log-probs: pass log_prob")
        return objective.step_advantages(rewards, group_ids, edge_ids, log_prob=log_prob())
    return objective.step_advantages(rewards, group_ids, edge_ids)
