"""FlowGRPO's objective (Liu et al., arXiv 2505.05470): the clipped GRPO loss with its defaults."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.plugins.objectives.base import (
    ClippedGRPO,
    aggregate_field,
    clip_range_field,
    eps_field,
    kl_beta_field,
    kl_include_dt_field,
    std_field,
    weights_field,
)


@attrs.frozen
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

    # every field, in ClippedGRPO's order (attrs appends redefined fields at the end), so that the
    # signature and the repr read as the other objectives'
    std: str = std_field("global")
    ddof: float = 0
    eps: float = eps_field(1e-4)
    aggregate: str = aggregate_field("reward")
    weights: Mapping[str, float] | None = weights_field()
    adv_clip: float | None = 5.0
    clip_range: float = clip_range_field(1e-4)
    kl_beta: float = kl_beta_field(0.04)
    kl_include_dt: bool = kl_include_dt_field(False)


@hookimpl
def register_objectives(register):
    register("flowgrpo", FlowGRPO)
