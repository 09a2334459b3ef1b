"""Files a run writes into ``checkpoints/`` and the folders ``export`` and ``sample`` write have the mode
a plain ``open()`` gives, ``0o666 & ~umask`` (safetensors alone writes 0600, which a team sharing a
model folder cannot read), and are still published atomically (no staging folder is left)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mixgrpo.core.checkpoint import EMA_FILE, MODEL_FILE, OPTIMIZER_FILE, umask

from .test_export import LORA_WEIGHTS, run_cli, train_run


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("lora, mask", [(True, 0o002), (False, 0o027)], ids=["lora-umask002", "full-umask027"])
def test_checkpoint_export_and_sample_files_honour_the_umask(tmp_path, capsys, lora, mask):
    old = os.umask(mask)
    try:
        assert umask() == mask
        train_run(tmp_path / "run", "shapes", None, lora, "TrainConfig.ema_decay = 0.5")
        rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "out")
        assert rc == 0, err
        rc, _, err = run_cli(capsys, "sample", tmp_path / "run", "--prompts", "a red circle", "--out",
                             tmp_path / "samples", "--steps", "2")
        assert rc == 0, err
    finally:
        os.umask(old)
    written = {}
    for folder in ("run/checkpoints", "out", "samples"):
        written.update({f"{folder}/{k}": v for k, v in modes(tmp_path / folder).items()})
    names = {Path(k).name for k in written}
    assert {MODEL_FILE, OPTIMIZER_FILE, EMA_FILE} <= names  # the safetensors files are among them
    assert LORA_WEIGHTS in names if lora else "diffusion_pytorch_model.safetensors" in names
    want = {k: (0o777 if (tmp_path / k).is_dir() else 0o666) & ~mask for k in written}
    assert {k: oct(v) for k, v in written.items()} == {k: oct(v) for k, v in want.items()}
    assert not list(tmp_path.glob(".*partial*")) and not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))
