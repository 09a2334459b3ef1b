"""A stop signal that reaches one process of a two-process run (`torchrun --nproc_per_node 2 mixgrpo
train ...`, gloo, CPU): a scheduler or a user may signal one rank only. Both ranks must finish the
iteration, write one checkpoint together, and exit 0, and the main rank prints the resume command."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mixgrpo.core.records import read_rows

from .conftest import ROOT, TOY

MIXGRPO_CLI = Path(sys.executable).with_name("mixgrpo")


def _ranks(launcher: subprocess.Popen, timeout: float = 120.0) -> dict[int, psutil.Process]:
    """The launcher's worker processes by rank (their RANK environment variable)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = {}
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None and "mixgrpo" in " ".join(child.cmdline()):
                found[int(rank)] = child
        if len(found) == 2:
            return found
        time.sleep(0.1)
    raise TimeoutError("the launcher did not start two ranks")


def test_sigterm_to_one_rank_stops_both_with_one_checkpoint_and_exit_0(tmp_path):
    out = tmp_path / "run"
    bindings = [*TOY, "TrainConfig.iterations = 500", "TrainConfig.checkpoint_every = 100",
                "TrainConfig.prompts_per_iteration = 2", "TrainConfig.tensorboard = False"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(tmp_path / "logs"), "--redirects", "3", "--monitor-interval", "1",
           "--no-python", str(MIXGRPO_CLI), "train", str(ROOT / "experiments" / "methods" / "mixgrpo.gin"),
           *sum((["--gin", b] for b in bindings), []), "--output", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path)
    try:
        ranks = _ranks(launcher)
        end = time.monotonic() + 180
        while len(read_rows(out / "metrics.jsonl")) < 2:
            assert launcher.poll() is None and time.monotonic() < end, "the run ended or hung before iteration 2"
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGTERM)  # the rank that does not write the records
        _, err = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err[-3000:]
    logs = {int(p.parent.name): p.parent for p in (tmp_path / "logs").rglob("stdout.log")}
    for rank in (0, 1):
        assert "Traceback" not in (logs[rank] / "stderr.log").read_text(), (logs[rank] / "stderr.log").read_text()
    rows = read_rows(out / "metrics.jsonl")
    last = rows[-1]["iteration"]
    assert last < 500
    stdout = (logs[0] / "stdout.log").read_text()
    assert f"stopped by a stop signal to another process after iteration {last} (checkpoint saved)" in stdout
    assert f"continue with: mixgrpo train {out} --resume" in stdout
    assert "SIGTERM: stopping after this iteration" in (logs[1] / "stdout.log").read_text()
    written = sorted(p.name for p in (out / "checkpoints").glob("iter_*"))
    assert written == [f"iter_{last:06d}"]  # one checkpoint, written by both ranks together
    assert (out / "checkpoints" / "latest").read_text() == f"iter_{last:06d}"
    assert re.fullmatch(r"\d+", str(last))
