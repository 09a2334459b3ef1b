"""mixgrpo: online RL (the GRPO family) for flow-matching text-to-image models.

Plugin authors need only this module: ``from mixgrpo import hookimpl`` and the interfaces.
"""

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import (
    Backbone,
    MatchingObjective,
    Objective,
    PolicyObjective,
    PromptSet,
    Reward,
    Sampler,
    TorchBackbone,
    WindowSchedule,
)
from mixgrpo.core.types import Conditioning, EditPrompt, SolverHistory, StepPlan, StepResult, Trajectories

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "Conditioning",
    "EditPrompt",
    "MatchingObjective",
    "Objective",
    "PolicyObjective",
    "PromptSet",
    "Reward",
    "Sampler",
    "SolverHistory",
    "StepPlan",
    "StepResult",
    "TorchBackbone",
    "Trajectories",
    "WindowSchedule",
    "hookimpl",
]
