"""Preemption, for real: `mixgrpo train` subprocesses killed with SIGKILL (mid-iteration and in the
middle of writing a checkpoint) and restarted with --resume end with the weights and metrics rows of
an uninterrupted run; SIGTERM (or a first Ctrl-C) stops a run with a checkpoint and exit status 0."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.core.records import read_rows

from .conftest import ROOT, TOY

ITERATIONS = 30
KILLS = 6


def command(out: Path, *extra: str) -> list[str]:
    bindings = [*TOY, f"TrainConfig.iterations = {ITERATIONS}", "TrainConfig.checkpoint_every = 1",
                "TrainConfig.tensorboard = False"]
    return [sys.executable, "-m", "mixgrpo", "train", str(ROOT / "experiments" / "methods" / "mixgrpo.gin"),
            *sum((["--gin", b] for b in bindings), []), "--output", str(out), *extra]


def start(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(command(out, *extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0, pause: float = 0.002) -> bool:
    """Poll ``condition`` every ``pause`` seconds until it holds (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(pause)
    raise TimeoutError("the training process neither progressed nor ended")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = start(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_run(straight, tmp_path):
    out, rng = tmp_path / "run", random.Random(7)
    checkpoints = out / "checkpoints"
    kills, mid_write = 0, 0
    for attempt in range(KILLS + 1):  # KILLS kills, then the run is left to finish
        proc = start(out, *(["--resume"] if attempt else []))
        if attempt == KILLS:
            break
        done = sorted(checkpoints.glob("iter_*")) if checkpoints.is_dir() else []
        if attempt % 2 == 0:  # kill while the next checkpoint is being written (a few ms: poll hard)
            hit = wait_for(lambda: any(checkpoints.glob(".tmp_iter_*")), proc, pause=0.0)
            mid_write += hit
        else:  # kill at a random moment after the next checkpoint landed
            hit = wait_for(lambda n=len(done): len(list(checkpoints.glob("iter_*"))) > n, proc)
            time.sleep(rng.uniform(0.0, 0.3))
        if not hit or proc.poll() is not None:  # it finished first
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        kills += 1
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert kills == KILLS and mid_write >= 1, (kills, mid_write)  # every kill landed, one at least mid-write
    assert not list(checkpoints.glob(".tmp_iter_*"))  # a half-written checkpoint never survives a resume
    final = f"iter_{ITERATIONS:06d}"
    a = load_file(str(straight / "checkpoints" / final / "model.safetensors"))
    b = load_file(str(checkpoints / final / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = read_rows(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))  # none missing, none twice
    assert deterministic(rows) == deterministic(read_rows(straight / "metrics.jsonl"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_checkpoints_and_exits_0(tmp_path, signum):
    out = tmp_path / "run"
    proc = start(out, "--gin", "TrainConfig.checkpoint_every = 100", "--gin", "TrainConfig.iterations = 500")
    assert wait_for(lambda: len(read_rows(out / "metrics.jsonl")) >= 2, proc)
    sent = time.monotonic()
    proc.send_signal(signum)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - sent < 60  # one iteration's time, not the run's
    rows = read_rows(out / "metrics.jsonl")
    last = rows[-1]["iteration"]
    assert f"stopped by {signal.Signals(signum).name} after iteration {last} (checkpoint saved)" in stdout
    assert "--resume" in stdout
    assert (out / "checkpoints" / f"iter_{last:06d}" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text() == f"iter_{last:06d}"
