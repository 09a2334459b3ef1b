"""Hook specifications of the ``mixgrpo`` plugin system (pluggy). No logic lives here.

A plugin is a module (or object) named by an entry point in the group ``mixgrpo``. It implements
any of these hooks with ``@mixgrpo.hookimpl``. Each ``register_*`` hook receives a ``register``
callable: ``register(name, factory)`` where ``name`` is the stable string used in gin files and on
the command line, and ``factory`` is the class (or callable) that builds the component.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from mixgrpo.core.trainer import Trainer

PROJECT = "mixgrpo"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register ``Backbone`` factories: ``register("flux", FluxBackbone)``."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register ``Sampler`` factories (ODE solvers and SDE samplers): ``register("euler", Euler)``.

    A new SDE noise form may subclass ``mixgrpo.plugins.samplers.sde.SDESampler`` (define ``std`` and
    ``mean``) or ``ReverseSDE`` (define the diffusion coefficient ``diffusion``).
    """


@hookspec
def register_schedules(register: Register) -> None:
    """Register ``WindowSchedule`` factories: ``register("progressive", ProgressiveWindow)``."""


@hookspec
def register_rewards(register: Register) -> None:
    """Register ``Reward`` factories: ``register("hpsv2", HPSv2Reward)``."""


@hookspec
def register_objectives(register: Register) -> None:
    """Register ``PolicyObjective`` factories: ``register("mixgrpo", MixGRPO)``.

    Every factory takes the keyword ``weights`` (``PolicyObjective``'s constructor contract): the trainer
    builds the objective as ``factory(weights=dict(TrainConfig.rewards))``, with the other arguments from
    gin bindings, and refuses, before anything loads, a factory that does not take it.
    """


@hookspec
def register_prompt_sets(register: Register) -> None:
    """Register prompt-set factories: ``register("shapes", ShapesPrompts)``.

    A prompt set is called as ``prompts(split, count, seed, iteration=None) -> list[str]`` with split
    ``"train"`` or ``"eval"``; the trainer asks for iteration k's training prompts of the run ``seed``
    with ``iteration=k`` (a stream without repeats within an epoch, for a finite set). A factory that
    subclasses ``interfaces.PromptSet`` may also declare ``training_only``.
    """


#: ``register(name, help, configure, run)``: ``configure(parser)`` adds the command's arguments to its
#: ``argparse`` sub-parser; ``run(args) -> int`` runs it and returns the exit status.
CommandRegister = Callable[[str, str, Callable[[Any], None], Callable[[Any], int]], None]


@hookspec
def register_commands(register: CommandRegister) -> None:
    """Register ``mixgrpo`` sub-commands: ``register("pretrain", "pretrain the base model", configure, run)``.

    The command line offers them beside its own (train, compare, eval, export, sample, plugins);
    errors they raise are reported as the built-in commands' are.
    """


@hookspec
def on_iteration_end(trainer: Trainer, iteration: int, metrics: dict[str, float]) -> None:
    """Called on every process after iteration ``iteration`` with its logged metrics."""


@hookspec
def on_checkpoint(trainer: Trainer, path: Path) -> None:
    """Called on the main process after a checkpoint was written (atomically) to ``path``."""
