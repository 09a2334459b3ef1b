"""Reading gin files: where an ``include`` is looked for, and gin's file readers made to answer
"not here" instead of crashing, without logging every miss."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any

import gin

from mixgrpo.core.progress import quiet

_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.MULTILINE)


def _search_paths(config: Path, _seen: set[Path] | None = None) -> list[Path]:
    """Where gin looks for this config's ``include``s: the folder of the file and the nearest
    ``experiments/`` folder above it, for the file itself and, recursively, for every file it
    includes by an absolute path, and last the presets installed with the package (so a gin file
    anywhere on disk may ``include 'methods/mixgrpo.gin'``)."""
    paths = _local_search_paths(config, _seen)
    from mixgrpo.experiments import PRESETS

    return paths if PRESETS in paths else [*paths, PRESETS]


def _local_search_paths(config: Path, _seen: set[Path] | None = None) -> list[Path]:
    seen = set() if _seen is None else _seen
    config = config.resolve()
    if config in seen:
        return []
    seen.add(config)
    paths = [config.parent]
    for parent in config.parents:
        if parent.name == "experiments":
            paths.append(parent)
            break
    if config.is_file():
        for name in _INCLUDE.findall(config.read_text()):
            target = Path(name)
            if not target.is_absolute():
                target = next((p / name for p in paths if (p / name).is_file()), target)
            if target.is_file():
                paths += [p for p in _local_search_paths(target, seen) if p not in paths]
    return paths


def _tolerant(exists: Any) -> Any:
    def check(path: str) -> bool:
        try:
            return bool(exists(path))
        except (TypeError, ValueError, ImportError, AttributeError):
            return False

    check._mixgrpo_tolerant = True  # type: ignore[attr-defined]
    return check


def _harden_gin_readers() -> None:
    """gin's second file reader treats the head of a relative include (``runs/x.gin``) as a Python
    package; a directory of that name in the working directory (``runs/`` is where every run writes)
    imports as a namespace package without a file, and gin crashes with ``TypeError: expected str ...
    not NoneType`` instead of trying the next search path. Make every existence check answer False
    when it cannot tell."""
    readers = gin.config._FILE_READERS
    for i, (reader, exists) in enumerate(readers):
        if not getattr(exists, "_mixgrpo_tolerant", False):
            readers[i] = (reader, _tolerant(exists))


def _quiet_search_misses() -> contextlib.AbstractContextManager:
    """gin logs an ERROR for every search path an ``include`` is not found in before the one it
    is found in; those misses are expected, and a file found nowhere still raises."""
    return quiet(logging.getLogger(), "Path not found")
