"""Two layers you can see: the engine (``core/``, ``mixgrpo.core``: interfaces, types, rollout, trainer,
advantages, sigmas, scoring, checkpoint, parallel, records, metrics, ...) and the commands and reports
(``commands/``, ``mixgrpo.commands``: the command line, comparisons, reports, export, sampling, model
cards, side-by-side evaluations). The engine imports nothing from the commands, at module level or
inside a function; plugins import nothing from the commands either (a plugin builds on the engine's
interfaces)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("folder", ["core", "plugins"])
def test_the_engine_and_the_plugins_import_nothing_from_the_commands(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert len(files) > 10
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}" for path in files
                 for line, module in imported_modules(path) if module.startswith("mixgrpo.commands")]
    assert not offenders, "\n".join(offenders)


def test_the_commands_use_the_engine():
    """The check above is not vacuous: the commands do import the engine (and the scan sees it)."""
    modules = {module for path in (ROOT / "commands").glob("*.py") for _, module in imported_modules(path)}
    assert "mixgrpo.core.trainer.Trainer" in modules and "mixgrpo.core.config" in modules


def test_importing_the_engine_loads_no_command():
    import subprocess
    import sys

    code = ("import sys, mixgrpo.core.trainer, mixgrpo.core.rollout, mixgrpo.core.config; "
            "print(sorted(m for m in sys.modules if m.startswith('mixgrpo.commands')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
