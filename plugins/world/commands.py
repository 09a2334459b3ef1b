"""The shapes world's command: ``mixgrpo pretrain CONFIG.gin`` builds and pretrains its base model.

Registered through the ``register_commands`` hook like any plugin's command, so the core knows
nothing about the world.
"""

from __future__ import annotations

import argparse

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.plugins.world.pretrain import PretrainConfig  # noqa: F401 (gin files bind it by name)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="pretraining .gin file (experiments/shapes/pretrain.gin)")
    parser.add_argument("--gin", action="append", metavar="BINDING",
                        help="extra gin binding, e.g. --gin \"PretrainConfig.steps = 100\" (repeatable)")


def run(args: argparse.Namespace) -> int:
    from mixgrpo.plugins.world.pretrain import run_pretrain

    run_pretrain(args.config, list(args.gin or []))
    return 0


@hookimpl
def register_commands(register):
    register("pretrain", "pretrain the shapes-world base model by flow matching", configure, run)
