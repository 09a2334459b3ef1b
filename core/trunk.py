"""Trunk rollouts (TempFlow-GRPO, docs/algorithms.md "TempFlow-GRPO"): process rewards at branch
steps off one ODE trunk per group.

A group's samples share its initial noise. The trunk is that noise walked once with the ODE down the
whole grid (one model row per group and step). At each of the plan's SDE steps j (the branch steps
B) k = ``plan.trunk_branches`` samples leave the trunk: each takes one SDE step from the trunk's
``x_j`` with the trunk's velocity there and its own noise, then the ODE to the end. A group therefore
holds ``k·|B|`` samples; row r of a group (rows in order, each group's consecutive) is child
``r mod k`` of branch step ``B[⌊r / k⌋]``. The k children of one branch step differ only through that
step's noise, so their rewards, normalized among them, are a reward for step j alone: the trajectories
returned name each (group, branch step) as a group of its own (``group_id·|B| + ⌊r / k⌋``), which is
where every objective computes its advantages, and each sample trains its own branch step only.

A sample stores one transition, that of its branch step: the ``K = |B|`` stored slots of its row in
``Trajectories`` are views of it (``expand``, no copy), and only its own slot is ever trained. The
trunk's own final image is not a sample and is not scored. Model calls per group: T for the trunk
and ``k·(T − j − 1)`` for the children of step j. Training runs the model once per (group, branch
step): the children share ``x_j`` (``Trajectories.nodes``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mixgrpo.core.interfaces import Backbone, Sampler
from mixgrpo.core.rollout import SamplingSetup, _ode_step, _record, encode_unique, initial_noise, step_noise
from mixgrpo.core.types import SolverHistory, StepPlan, Trajectories, first_of_each


def branch_rows(plan: StepPlan, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, branch)``, each ``[N]``: the row of each sample's group's first sample, and the index
    in ``plan.sde_steps`` of the sample's branch step. Rows are each group's ``k·|B|`` samples,
    consecutive (checked)."""
    size = plan.trunk_branches * len(plan.sde_steps)
    groups, first, which = first_of_each(group_ids)
    counts = torch.bincount(which, minlength=len(groups))
    position = torch.arange(len(group_ids)) - first[which]
    if bool((counts != size).any()) or bool((position >= size).any()):
        raise ValueError(f"a trunk rollout needs each group's samples as {size} consecutive rows (trunk_branches "
                         f"{plan.trunk_branches} x {len(plan.sde_steps)} branch steps); got group sizes "
                         f"{counts.tolist()}")
    return first[which], position // plan.trunk_branches


@torch.no_grad()
def trunk_rollout(backbone: Backbone, prompts: Sequence[str], group_ids: torch.Tensor, sample_ids: torch.Tensor,
                  plan: StepPlan, *, setup: SamplingSetup, sde_sampler: Sampler, post_solver: Sampler, seed: int,
                  iteration: int, batch_size: int = 16,
                  on_images: Callable[[torch.Tensor, slice], None] | None = None,
                  keep_means: bool = False) -> Trajectories:
    """The rollout of a trunk plan: ``core.rollout.rollout``'s arguments and result (ODE steps with
    ``post_solver``). A model call takes up to ``batch_size`` trunks, or the children of one branch step
    of ``max(1, batch_size // k)`` groups; ``on_images`` receives each group's children of a branch step
    at once. Every process makes the same calls (as many groups each), as FSDP's collectives need."""
    if not setup.shared_noise:
        raise ValueError("a trunk rollout walks each group's one initial noise: set TrainConfig.shared_noise = True")
    n = len(prompts)
    first, branch = branch_rows(plan, group_ids)
    steps, k = tuple(plan.sde_steps), plan.trunk_branches
    cond = encode_unique(backbone, prompts)
    sigmas = setup.sigmas(plan)
    num_steps = sigmas.numel() - 1
    shape, device = backbone.latent_shape(), backbone.device
    x_T = initial_noise(shape, group_ids, sample_ids, seed, iteration, True)
    trunks = first.unique(sorted=True)
    trunk = _Trunk(backbone, cond, x_T, trunks, sigmas, steps, post_solver, batch_size)
    # each row's one transition (that of its branch step); its K slots are views of it (below)
    out = {"x": torch.zeros(n, *shape), "x_next": torch.zeros(n, *shape), "log_prob": torch.zeros(n, len(steps)),
           "mean": torch.zeros(n, *shape) if keep_means else None}
    latents, images = torch.zeros(n, *shape), None
    calls = num_steps * len(trunks)
    per_call = max(1, batch_size // k)
    for slot, j in enumerate(steps):
        for start in range(0, len(trunks), per_call):
            heads = trunks[start:start + per_call]
            rows = torch.cat([int(h) + slot * k + torch.arange(k) for h in heads])
            index = torch.arange(len(heads)).repeat_interleave(k) + start
            x, v, history = trunk.at(j, index)
            noise = step_noise(shape, sample_ids[rows], seed, iteration, j).to(device)
            res = sde_sampler.step(x, v, sigmas, j, history=history, noise=noise)
            out["x"][rows], out["x_next"][rows] = x.float().cpu(), res.prev_sample.float().cpu()
            out["log_prob"][rows, slot] = res.log_prob.float().cpu()
            if keep_means:
                out["mean"][rows] = res.mean.float().cpu()
            _record(history, res, x, v, sigmas, j)
            x, c = res.prev_sample, cond.select(rows)
            for i in range(j + 1, num_steps):
                v = backbone.velocity(x, torch.full((len(rows),), float(sigmas[i]), device=device), c).float()
                x = _ode_step(post_solver, x, v, sigmas, i, history)
            calls += len(rows) * (num_steps - j - 1)
            decoded = backbone.decode(x).float()
            latents[rows] = x.float().cpu()
            if images is None:
                images = torch.zeros(n, *decoded.shape[1:])
            images[rows] = decoded.cpu()
            for g, head in enumerate(heads.tolist()):
                part = slice(head + slot * k, head + (slot + 1) * k)
                if on_images is not None:
                    on_images(decoded[g * k:(g + 1) * k], part)
    nodes = sample_ids[:, None].repeat(1, len(steps))
    nodes[torch.arange(n), branch] = sample_ids[first]  # the children of a branch step share the trunk's x_j
    branch_groups = group_ids * len(steps) + branch

    def slots(own: torch.Tensor | None) -> torch.Tensor | None:  # [N, K, ...] without a copy: 1/K of the memory
        return None if own is None else own.unsqueeze(1).expand(n, len(steps), *shape)

    return Trajectories(prompts=list(prompts), group_ids=branch_groups, sample_ids=sample_ids, sigmas=sigmas,
                        plan=plan, sde_steps=steps, x=slots(out["x"]), x_next=slots(out["x_next"]),
                        log_prob=out["log_prob"], latents=latents,
                        images=images if images is not None else latents.new_zeros(0, 3, 1, 1), cond=cond,
                        nfe=calls / max(n, 1) * backbone.calls_per_velocity, seed=seed, mean=slots(out["mean"]),
                        nodes=nodes)


class _Trunk:
    """Every group's ODE trunk, walked once in batches of ``batch_size`` groups: at each branch step
    its latents, velocity and solver history, one row per group (in the order of ``heads``)."""

    def __init__(self, backbone: Backbone, cond, x_T: torch.Tensor, heads: torch.Tensor, sigmas: torch.Tensor,
                 steps: tuple[int, ...], solver: Sampler, batch_size: int) -> None:
        device = backbone.device
        kept: dict[int, list[tuple[torch.Tensor, torch.Tensor, tuple]]] = {j: [] for j in steps}
        for start in range(0, len(heads), batch_size):
            rows = heads[start:start + batch_size]
            x, c, history = x_T[rows].to(device), cond.select(rows), SolverHistory()
            for i in range(sigmas.numel() - 1):
                v = backbone.velocity(x, torch.full((len(rows),), float(sigmas[i]), device=device), c).float()
                if i in kept:
                    kept[i].append((x.float(), v, tuple(history.entries)))
                x = _ode_step(solver, x, v, sigmas, i, history)
        self.x = {j: torch.cat([p[0] for p in parts]) for j, parts in kept.items()}
        self.v = {j: torch.cat([p[1] for p in parts]) for j, parts in kept.items()}
        self.history = {j: tuple((entries[0][0], torch.cat([e[1] for e in entries]))
                                 for entries in zip(*(p[2] for p in parts), strict=True))
                        for j, parts in kept.items()}

    def at(self, j: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, SolverHistory]:
        """The trunk's ``x_j``, ``v(x_j)`` and history at branch step ``j``, for trunk rows ``index``."""
        where = index.to(self.x[j].device)
        return (self.x[j][where], self.v[j][where],
                SolverHistory([(sigma, x0[where]) for sigma, x0 in self.history[j]]))
