"""Atomic checkpoints and resume.

A checkpoint is ``checkpoints/iter_XXXXXX/``: accelerate's state (weights as safetensors, optimizer,
RNG) plus ``trainer_state.json``. It is written to a temporary folder and renamed into place, then
``checkpoints/latest`` is replaced atomically, so a crash mid-write never leaves a half checkpoint
that resume would pick up. Windows, prompts and noise are pure functions of (seed, iteration), so
the iteration number is all the extra state resume needs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mixgrpo.core.trainer import Trainer

STATE_FILE = "trainer_state.json"


def save(trainer: Trainer, root: Path, iteration: int) -> Path:
    acc = trainer.accelerator
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp_iter_{iteration:06d}"
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    if acc.is_main_process:
        state = {"iteration": iteration, "seed": trainer.config.seed, "objective": trainer.config.objective}
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
    acc.wait_for_everyone()
    return final


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def resume(trainer: Trainer, root: Path) -> int:
    """Load the latest checkpoint under ``root``; returns the iteration to continue from (0 if none)."""
    path = latest(root)
    if path is None:
        return 0
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("seed") != trainer.config.seed:
        raise ValueError(f"checkpoint {path} was written with seed {state.get('seed')} but the config has seed "
                         f"{trainer.config.seed}; resume with the same config or use a new output_dir")
    trainer.accelerator.load_state(str(path))
    return int(state["iteration"])
