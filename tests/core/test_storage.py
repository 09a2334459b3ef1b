"""A full or read-only disk, for real: the run directory on a small tmpfs (or one remounted
read-only) in a private mount namespace (``unshare -rm``: no privileges needed). The run stops with
a message naming the path and the free space, exit status 1, and the last good checkpoint intact."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mixgrpo.core.records import read_rows

from .conftest import ROOT, TOY


def train(out: Path, *extra: str) -> str:
    bindings = [*TOY, "TrainConfig.checkpoint_every = 1", "TrainConfig.tensorboard = False"]
    args = [sys.executable, "-m", "mixgrpo", "train", str(ROOT / "experiments" / "methods" / "mixgrpo.gin"),
            *sum((["--gin", b] for b in bindings), []), "--output", str(out), *extra]
    return shlex.join(args)


def in_namespace(script: str, tmp: Path) -> subprocess.CompletedProcess:
    if shutil.which("unshare") is None:
        pytest.fail("util-linux's unshare is needed for the storage tests")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp)


def test_a_full_disk_stops_the_run_with_the_path_and_free_space(tmp_path):
    disk, out = tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    # room for the records and one checkpoint (about 60 KiB on tmpfs), not for a second
    script = (f"mount -t tmpfs -o size=100k tmpfs {disk} && "
              f"{train(out, '--gin', 'TrainConfig.iterations = 5')}; echo \"exit=$?\"; "
              f"cp -r {out} {tmp_path / 'copy'}")
    result = in_namespace(script, tmp_path)
    assert "exit=1" in result.stdout, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("mixgrpo train: error: cannot write ") and "No space left on device" in message
    assert "free on that filesystem" in message and "the last good checkpoint is" in message
    assert "Traceback" not in result.stderr
    copy = tmp_path / "copy"  # what the full disk held when the run stopped
    latest = (copy / "checkpoints" / "latest").read_text()
    assert latest in message
    assert load_file(str(copy / "checkpoints" / latest / "model.safetensors"))  # intact and loadable
    assert not list((copy / "checkpoints").glob(".tmp_iter_*"))  # the failed write was cleaned away
    assert [r["iteration"] for r in read_rows(copy / "metrics.jsonl")][0] == 1


def test_a_read_only_disk_stops_a_resume_without_touching_the_run(tmp_path):
    disk, out = tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=4m tmpfs {disk} && "
              f"{train(out, '--gin', 'TrainConfig.iterations = 2')} > /dev/null 2>&1 && "
              f"mount -o remount,ro {disk} && "
              f"{train(out, '--gin', 'TrainConfig.iterations = 4', '--resume')}; echo \"exit=$?\"; "
              f"cp -r {out} {tmp_path / 'copy'}")
    result = in_namespace(script, tmp_path)
    assert "exit=1" in result.stdout, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "cannot write" in message and "Read-only file system" in message
    assert "the last good checkpoint is" in message and "iter_000002" in message
    copy = tmp_path / "copy"
    assert [r["iteration"] for r in read_rows(copy / "metrics.jsonl")] == [1, 2]
    assert load_file(str(copy / "checkpoints" / "iter_000002" / "model.safetensors"))
