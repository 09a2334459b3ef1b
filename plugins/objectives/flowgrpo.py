"""FlowGRPO's objective (Liu et al., arXiv 2505.05470): the clipped GRPO loss with its defaults."""

from __future__ import annotations

from collections.abc import Mapping

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.plugins.objectives.base import ClippedGRPO


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

    def __init__(
        self,
        std: str = "global",
        ddof: float = 0,
        eps: float = 1e-4,
        aggregate: str = "reward",
        weights: Mapping[str, float] | None = None,
        adv_clip: float | None = 5.0,
        clip_range: float = 1e-4,
        kl_beta: float = 0.04,
        kl_include_dt: bool = False,
    ) -> None:
        super().__init__(std=std, ddof=ddof, eps=eps, aggregate=aggregate, weights=weights, adv_clip=adv_clip,
                         clip_range=clip_range, kl_beta=kl_beta, kl_include_dt=kl_include_dt)


@hookimpl
def register_objectives(register):
    register("flowgrpo", FlowGRPO)
