"""DanceGRPO's objective (Xue et al., arXiv 2505.07818): the clipped GRPO loss with its defaults."""

from __future__ import annotations

import attrs

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.plugins.objectives.base import ClippedGRPO


@attrs.frozen
class DanceGRPO(ClippedGRPO):
    """DanceGRPO (arXiv 2505.07818 and its public code): a group is the G samples of one prompt,
    kept on one process; per-group mean and unbiased std (ddof 1) plus eps 1e-8; several rewards
    get per-reward advantages (the reference's video code keeps one loss per reward; here they are
    averaged with normalized weights, as MixGRPO does); advantages clipped to ±5; ratio clip 1e-4;
    no KL.

    Args and defaults: ``ClippedGRPO``'s, which are this method's: ``std="group"``, ``ddof=1``, ``eps=1e-8``,
    ``aggregate="advantage"``, ``adv_clip=5.0``, ``clip_range=1e-4``, ``kl_beta=0.0``.
    """


@hookimpl
def register_objectives(register):
    register("dancegrpo", DanceGRPO)
