"""BranchGRPO's objective (Li et al., arXiv 2509.06040): depth-wise advantages over each group's tree.

A tree rollout (``core/tree.py``) trains every edge of the tree, i.e. each transition once. An edge
leads into a node; the node's reward is the mean of its leaves' rewards (the reference's default
fusion, ``compute_node_rewards_from_leaves`` without ``--tree_prob_weighted``), and the edge's
advantage is that reward's z-score among the nodes of the same depth of the same tree
(``compute_hierarchical_advantages_by_depth``: unbiased std, eps 1e-8; a depth with one node, or
with equal rewards, gets 0), clamped to ±5 (``--adv_clip_max``) as the reference does in its loss.
At the leaves' depth this is the per-group advantage every GRPO objective computes.
"""

from __future__ import annotations

import attrs
import torch

from mixgrpo.core.advantages import group_advantages
from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.types import first_of_each
from mixgrpo.plugins.objectives.base import ClippedGRPO, clip_range_field, in_base_order


def node_rewards(reward: torch.Tensor, which: torch.Tensor, nodes: int) -> torch.Tensor:
    """``[nodes]`` float64: the mean of each node's leaves' rewards (``which[n]``: leaf n's node);
    NaN (failed) leaves are left out, and a node with none is NaN."""
    r = reward.detach().to(torch.float64).cpu()
    valid = ~torch.isnan(r)
    total = torch.zeros(nodes, dtype=torch.float64).index_add_(0, which, torch.where(valid, r, torch.zeros_like(r)))
    count = torch.zeros(nodes, dtype=torch.float64).index_add_(0, which, valid.double())
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


@attrs.frozen(field_transformer=in_base_order)
class BranchGRPO(ClippedGRPO):
    """BranchGRPO: ``ClippedGRPO`` (per-group, unbiased std, eps 1e-8, clamp ±5, no KL) whose advantage
    of a transition is that of the tree node it leads into, normalized among that depth's nodes.

    Args and defaults: ``ClippedGRPO``'s, with ``clip_range=1e-3`` (the reference script's
    ``--clip_range``).
    """

    clip_range: float = clip_range_field(1e-3)

    def step_advantages(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor,
                        edge_ids: torch.Tensor) -> torch.Tensor:
        """``[N, K]``: column k holds, for each leaf, the advantage of its transition's child node at
        stored step k (``edge_ids[:, k]`` names the nodes; equal ids share a node)."""
        columns = [self._depth(rewards, group_ids, edge_ids[:, k]) for k in range(edge_ids.shape[1])]
        return torch.stack(columns, 1) if columns else torch.zeros(len(group_ids), 0)

    def _depth(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """``[N]``: one depth's node advantages, given to each of the node's leaves."""
        ids, first, which = first_of_each(edges.cpu())
        rewards = {name: node_rewards(r, which, len(ids)) for name, r in rewards.items()}
        adv = group_advantages(rewards, group_ids.cpu()[first], std=self.std, ddof=self.ddof, eps=self.eps,
                               weights=self.weights, aggregate=self.aggregate, clip=self.adv_clip)
        return adv[which].to(group_ids.device)


@hookimpl
def register_objectives(register):
    register("branchgrpo", BranchGRPO)
