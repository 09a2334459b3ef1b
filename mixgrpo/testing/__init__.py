"""Contract-test mixins for plugin authors (in the manner of diffusers' common scheduler tests).

Subclass one in your plugin's tests and say how to build the component::

    from mixgrpo.testing import SamplerContract

    class TestMySampler(SamplerContract):
        def make_sampler(self):
            return MySampler()

The mixins are plain classes with ``test_*`` methods; pytest collects them through your subclass.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BackboneContract": "mixgrpo.testing.backbones",
    "MatchingObjectiveContract": "mixgrpo.testing.matching",
    "ObjectiveContract": "mixgrpo.testing.objectives",
    "RewardContract": "mixgrpo.testing.rewards",
    "SamplerContract": "mixgrpo.testing.samplers",
    "ScheduleContract": "mixgrpo.testing.schedules",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mixgrpo.testing' has no attribute {name!r}")
