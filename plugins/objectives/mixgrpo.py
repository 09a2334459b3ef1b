"""MixGRPO's objective (Li et al., arXiv 2507.21802): the clipped GRPO loss with its defaults."""

from __future__ import annotations

import attrs

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.plugins.objectives.base import ClippedGRPO


@attrs.frozen
class MixGRPO(ClippedGRPO):
    """MixGRPO (arXiv 2507.21802 and its public code): a group is the G = 12 samples of one prompt;
    per-group, per-reward z-scores with the unbiased std (ddof 1) plus eps 1e-8, combined as a
    weighted AVERAGE of the per-reward advantages (weights normalized to sum to 1; the paper
    writes a sum, K× larger); advantages clipped to ±5; ratio clip 1e-4; no KL.

    Args and defaults: ``ClippedGRPO``'s, which are this method's: ``std="group"``, ``ddof=1``, ``eps=1e-8``,
    ``aggregate="advantage"``, ``adv_clip=5.0``, ``clip_range=1e-4``, ``kl_beta=0.0``.
    """


@hookimpl
def register_objectives(register):
    register("mixgrpo", MixGRPO)
