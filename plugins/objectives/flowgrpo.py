"""FlowGRPO's objective (Liu et al., arXiv 2505.05470): the clipped GRPO loss with its defaults."""

from __future__ import annotations

import attrs

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.plugins.objectives.base import (
    ClippedGRPO,
    aggregate_field,
    ddof_field,
    eps_field,
    in_base_order,
    kl_beta_field,
    std_field,
)


@attrs.frozen(field_transformer=in_base_order)
class FlowGRPO(ClippedGRPO):
    """FlowGRPO (arXiv 2505.05470 and its public code): a group is all samples of one prompt in the
    iteration, gathered across processes; advantages use the per-prompt mean and the std of ALL
    rewards of the iteration (population, ddof 0) plus eps 1e-4; several rewards are summed with
    their weights before one normalization; ratio clip 1e-4; KL to the frozen base with β = 0.04
    (GenEval / OCR; the paper uses 0.01 for PickScore and 0 on FLUX).

    Args: as ``ClippedGRPO``, with defaults ``std="global"``, ``ddof=0``, ``eps=1e-4``,
    ``aggregate="reward"``, ``adv_clip=5.0``, ``clip_range=1e-4``, ``kl_beta=0.04``,
    ``kl_include_dt=False`` (the reference's KL, Δ absorbed into β).
    """

    # the fields whose defaults differ from ClippedGRPO's (in_base_order keeps ClippedGRPO's order)
    std: str = std_field("global")
    ddof: float = ddof_field(0)
    eps: float = eps_field(1e-4)
    aggregate: str = aggregate_field("reward")
    kl_beta: float = kl_beta_field(0.04)


@hookimpl
def register_objectives(register):
    register("flowgrpo", FlowGRPO)
