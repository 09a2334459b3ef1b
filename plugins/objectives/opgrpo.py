"""OP-GRPO (Zhang et al., arXiv 2604.04142): FlowGRPO's objective made off-policy by a replay buffer.

The objective's loss and advantages are FlowGRPO's; what it adds is a ``ReplaySpec`` (its ``replay``
property), which makes the trainer keep one stored trajectory per prompt and mix it into later groups
with a sequence-level importance weight over the reused early steps (``core/replay.py``,
docs/algorithms.md "OP-GRPO").
"""

from __future__ import annotations

from typing import Any

import attrs

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.types import ReplaySpec
from mixgrpo.plugins.objectives.base import in_base_order
from mixgrpo.plugins.objectives.flowgrpo import FlowGRPO


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@attrs.frozen(field_transformer=in_base_order)
class OPGRPO(FlowGRPO):
    """FlowGRPO with off-policy replay: each group whose prompt has a stored trajectory gets it in
    place of its last fresh sample.

    Args: as ``FlowGRPO``, and
        truncate_step (`int`, defaults to 5): τ, the reused steps 0 … τ−1; from the stored x_τ the
            current policy draws the late steps anew (their off-policy ratios are ill-conditioned).
        capacity (`int`, defaults to 512): the most prompts the buffer holds.
        max_age (`int`, defaults to 10): iterations after which a stored trajectory is dropped.
        replay_weight (`str`, defaults to ``"product"``): the sequence-level importance weight,
            ``"product"`` Π π_old/π_b over the reused steps or ``"geometric"`` its τ-th root.
        max_weight (`float`, defaults to None): a cap on that weight (None: none).
    """

    truncate_step: int = 5
    capacity: int = 512
    max_age: int = 10
    replay_weight: str = "product"
    max_weight: float | None = attrs.field(default=None, converter=_optional_float)

    def __attrs_post_init__(self) -> None:
        try:  # the ReplaySpec checks the values; its message then names this class's arguments
            self.replay  # noqa: B018
        except ValueError as exc:
            raise ValueError(str(exc).replace("ReplaySpec.weight", "ReplaySpec.replay_weight")
                             .replace("ReplaySpec.", f"{type(self).__name__}.")) from None

    @property
    def replay(self) -> ReplaySpec:
        return ReplaySpec(truncate_step=self.truncate_step, capacity=self.capacity, max_age=self.max_age,
                          weight=self.replay_weight, max_weight=self.max_weight)


@hookimpl
def register_objectives(register):
    register("opgrpo", OPGRPO)
