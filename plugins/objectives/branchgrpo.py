"""BranchGRPO's objective (Li et al., arXiv 2509.06040): depth-wise advantages over each group's tree.

A tree rollout (``core/tree.py``) trains every edge of the tree, i.e. each transition once. An edge
leads into a node; the node's reward is the mean of its leaves' rewards (the reference's default
fusion, ``compute_node_rewards_from_leaves`` without ``--tree_prob_weighted``), and the edge's
advantage is that reward's z-score among the nodes of the same depth of the same tree
(``compute_hierarchical_advantages_by_depth``: unbiased std, eps 1e-8; a depth with one node, or
with equal rewards, gets 0), clamped to ±5 (``--adv_clip_max``) as the reference does in its loss.
At the leaves' depth this is the per-group advantage every GRPO objective computes.

Width pruning (the reference's ``--width_pruning_mode`` 1 and 2 with ``--width_pruning_ratio``, off in
its script) trains only part of the transitions after the last split, chosen by advantage; the others
get a NaN advantage, which leaves them out of training (``PolicyObjective.step_advantages``).

Probability-weighted fusion (``prob_weighted``, the reference's ``--tree_prob_weighted``, off in its
script) replaces the mean of a node's leaves by a bottom-up fusion: a node with one child takes the
child's reward, a node that splits the softmax of its children's edge log-probs times their rewards.
"""

from __future__ import annotations

import math

import attrs
import torch

from mixgrpo.core.advantages import group_advantages
from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.types import first_of_each
from mixgrpo.plugins.objectives.base import ClippedGRPO, clip_range_field, in_base_order

WIDTH_PRUNING = ("none", "per_branch", "best_worst")


def node_rewards(reward: torch.Tensor, which: torch.Tensor, nodes: int) -> torch.Tensor:
    """``[nodes]`` float64: the mean of each node's leaves' rewards (``which[n]``: leaf n's node);
    NaN (failed) leaves are left out, and a node with none is NaN."""
    r = reward.detach().to(torch.float64).cpu()
    valid = ~torch.isnan(r)
    total = torch.zeros(nodes, dtype=torch.float64).index_add_(0, which, torch.where(valid, r, torch.zeros_like(r)))
    count = torch.zeros(nodes, dtype=torch.float64).index_add_(0, which, valid.double())
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def fused_node_rewards(reward: torch.Tensor, edge_ids: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` float64: the probability-weighted reward of the node each leaf's transition at stored
    step k leads into, bottom-up: at the last step the mean of its leaves; above, a node with one child
    takes the child's reward and a node with several ``Σ_c softmax(log_prob_c)·R(c)`` over its children c
    (``log_prob_c``: the log-prob of the edge into c). Children with a NaN (failed) reward are left out
    of the softmax; a node with none is NaN."""
    r = reward.detach().to(torch.float64).cpu()
    edges, lp = edge_ids.cpu(), log_prob.detach().to(torch.float64).cpu()
    n, k_steps = edges.shape
    out = torch.full((n, k_steps), float("nan"), dtype=torch.float64)
    if not k_steps:
        return out
    ids, _, which = first_of_each(edges[:, -1])
    value = node_rewards(r, which, len(ids))[which]
    out[:, -1] = value
    for k in range(k_steps - 2, -1, -1):
        fused = torch.empty(n, dtype=torch.float64)
        for node in torch.unique(edges[:, k]).tolist():
            rows = (edges[:, k] == node).nonzero().flatten()
            _, first, _ = first_of_each(edges[rows, k + 1])
            children, weights = value[rows[first]], lp[rows[first], k + 1]
            ok = ~torch.isnan(children)
            if len(first) == 1 or not bool(ok.any()):
                fused[rows] = children[0] if len(first) == 1 else float("nan")
            else:
                fused[rows] = (torch.softmax(weights[ok], 0) * children[ok]).sum()
        value = fused
        out[:, k] = value
    return out


@attrs.frozen(field_transformer=in_base_order)
class BranchGRPO(ClippedGRPO):
    """BranchGRPO: ``ClippedGRPO`` (per-group, unbiased std, eps 1e-8, clamp ±5, no KL) whose advantage
    of a transition is that of the tree node it leads into, normalized among that depth's nodes.

    Args and defaults: ``ClippedGRPO``'s, with ``clip_range=1e-3`` (the reference script's
    ``--clip_range``), and
        width_pruning (`str`, defaults to `"none"`):
            Which transitions after the last split train: ``"none"`` all; ``"per_branch"`` (the
            reference's mode 1) in each leaf's chain the ``max(1, ⌊ratio·L⌋)`` of highest advantage (L
            the chain's transitions); ``"best_worst"`` (mode 2) over the whole batch, of its M such
            transitions, the ``⌊k/2⌋`` highest and ``k − ⌊k/2⌋`` lowest, k = ``max(2, ⌊ratio·M⌋)``.
            Ties keep the reference's order: leaves in order, steps ascending.
        width_ratio (`float`, defaults to 0.5):
            The share kept (the reference's ``--width_pruning_ratio``), in (0, 1].
        prob_weighted (`bool`, defaults to False):
            A node's reward is the probability-weighted fusion of its children's (``fused_node_rewards``,
            the reference's ``--tree_prob_weighted``) instead of the mean of its leaves.
        prune_until (`int`, defaults to None):
            The last iteration (1-based) whose width pruning applies; later ones train every transition
            (None: every iteration prunes). The reference's ``--pruning_step_ratio r`` of a run of n
            iterations is ``int(r·n)``, for ``Branching.prune_until`` too.
    """

    clip_range: float = clip_range_field(1e-3)
    width_pruning: str = attrs.field(default="none", validator=attrs.validators.in_(WIDTH_PRUNING))
    width_ratio: float = attrs.field(default=0.5, converter=float)
    prob_weighted: bool = attrs.field(default=False, converter=bool)
    prune_until: int | None = attrs.field(default=None, converter=attrs.converters.optional(int))

    def at_iteration(self, iteration: int) -> BranchGRPO:
        """Without width pruning after ``prune_until`` (the reference's ``should_prune``)."""
        if self.width_pruning != "none" and self.prune_until is not None and iteration + 1 > self.prune_until:
            return attrs.evolve(self, width_pruning="none", prune_until=None)
        return self

    @property
    def advantages_use_log_probs(self) -> bool:
        return self.prob_weighted

    def __attrs_post_init__(self) -> None:
        if not 0 < self.width_ratio <= 1:
            raise ValueError(f"width_ratio must be in (0, 1], got {self.width_ratio}")
        if self.prune_until is not None and self.prune_until < 0:
            raise ValueError(f"BranchGRPO.prune_until must be an iteration >= 0 or None, got {self.prune_until}")

    def step_advantages(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor,
                        edge_ids: torch.Tensor, log_prob: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, K]``: column k holds, for each leaf, the advantage of its transition's child node at
        stored step k (``edge_ids[:, k]`` names the nodes; equal ids share a node); ``log_prob`` ``[N, K]``
        (the rollout's, of the same transitions) is what ``prob_weighted`` weighs by."""
        fused = None
        if self.prob_weighted:
            if log_prob is None:
                raise ValueError("BranchGRPO.prob_weighted weighs node rewards by the edges' log-probs: pass log_prob")
            fused = {name: fused_node_rewards(r, edge_ids, log_prob) for name, r in rewards.items()}
        columns = [self._depth(rewards, group_ids, edge_ids[:, k], None if fused is None else
                               {name: f[:, k] for name, f in fused.items()}) for k in range(edge_ids.shape[1])]
        adv = torch.stack(columns, 1) if columns else torch.zeros(len(group_ids), 0)
        return adv if self.width_pruning == "none" else self._prune(adv, last_layer(group_ids, edge_ids))

    def _prune(self, adv: torch.Tensor, after: int) -> torch.Tensor:
        """``adv`` with NaN on the transitions of columns ``after ..`` that width pruning drops."""
        tail = adv[:, after:]
        if tail.numel() == 0:
            return adv
        keep = torch.zeros(tail.shape, dtype=torch.bool)
        if self.width_pruning == "per_branch":
            count = max(1, math.floor(self.width_ratio * tail.shape[1]))
            order = torch.sort(tail.cpu(), dim=1, descending=True, stable=True).indices[:, :count]
            keep.scatter_(1, order, True)
        else:
            flat = tail.cpu().reshape(-1)  # row-major: leaves in order, steps ascending
            count = max(2, math.floor(self.width_ratio * flat.numel()))
            order = torch.sort(flat, descending=True, stable=True).indices
            best = count // 2
            chosen = torch.cat([order[:best], order[len(order) - (count - best):]])
            keep.view(-1)[chosen] = True
        out = adv.clone()
        out[:, after:] = torch.where(keep.to(adv.device), tail, torch.full_like(tail, float("nan")))
        return out

    def _depth(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor, edges: torch.Tensor,
               fused: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``[N]``: one depth's node advantages, given to each of the node's leaves (the node rewards: the
        mean of the leaves, or ``fused``'s per leaf)."""
        ids, first, which = first_of_each(edges.cpu())
        rewards = ({name: node_rewards(r, which, len(ids)) for name, r in rewards.items()} if fused is None else
                   {name: f[first] for name, f in fused.items()})
        adv = group_advantages(rewards, group_ids.cpu()[first], std=self.std, ddof=self.ddof, eps=self.eps,
                               weights=self.weights, aggregate=self.aggregate, clip=self.adv_clip)
        return adv[which].to(group_ids.device)


def last_layer(group_ids: torch.Tensor, edge_ids: torch.Tensor) -> int:
    """The first stored step after the last split: a split is a column whose transitions lead into more
    distinct nodes than the column before (the first column is compared with the groups)."""
    distinct = [len(torch.unique(group_ids))] + [len(torch.unique(edge_ids[:, k])) for k in range(edge_ids.shape[1])]
    splits = [k for k in range(edge_ids.shape[1]) if distinct[k + 1] > distinct[k]]
    return splits[-1] + 1 if splits else edge_ids.shape[1]


@hookimpl
def register_objectives(register):
    register("branchgrpo", BranchGRPO)
