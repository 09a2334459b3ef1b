"""Bad input under a real two-process launch (gloo, CPU) with a setting that only two processes make
wrong. Every rank must refuse it on its own (exit status 2, one error paragraph, no traceback) before any
model loads, and no rank may wait on the other in a collective.

The two ranks are started here with the environment torchrun gives them (RANK, WORLD_SIZE, MASTER_ADDR,
...) rather than through torchrun itself: torchrun terminates the remaining ranks once one has exited, so
on a loaded machine a rank that was about to refuse on its own is reported as killed (SIGTERM), and its
own status and message are lost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .conftest import ROOT, TOY

MIXGRPO_CLI = Path(sys.executable).with_name("mixgrpo")  # the console script, as a user runs it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prompts_not_divisible_by_two_processes_stop_every_rank_before_the_model_loads(tmp_path):
    bindings = [*TOY, "TrainConfig.prompts_per_iteration = 3",
                # a model load would fail with another message: the refusal must come first
                "TrainConfig.backbone = 'flux'", "FluxBackbone.path = '/nonexistent/flux'"]
    cmd = [str(MIXGRPO_CLI), "train", str(ROOT / "experiments" / "methods" / "mixgrpo.gin"),
           *sum((["--gin", b] for b in bindings), []), "--output", str(tmp_path / "run")]
    port = str(_free_port())
    ranks = []
    start = time.monotonic()
    for rank in (0, 1):
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", GROUP_RANK="0", ROLE_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        err = open(tmp_path / f"stderr{rank}.log", "w")
        ranks.append((subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path), err))
    try:
        statuses = {rank: proc.wait(timeout=180) for rank, (proc, _) in enumerate(ranks)}
    finally:
        for proc, err in ranks:
            proc.kill()
            err.close()
    elapsed = time.monotonic() - start
    logs = [(tmp_path / f"stderr{rank}.log").read_text() for rank in (0, 1)]
    # each rank came back by itself (no rank hung) with the CLI's usage-error status
    assert statuses == {0: 2, 1: 2}, logs
    expected = ('mixgrpo train: error: TrainConfig.prompts_per_iteration = 3 is not divisible by the number of '
                'processes (2), so the processes cannot each hold whole groups: set it to a multiple of 2 '
                '(--gin "TrainConfig.prompts_per_iteration = 2" or --gin "TrainConfig.prompts_per_iteration = 4"), '
                'or launch a number of processes that divides 3')
    for err in logs:  # every rank says it itself: one paragraph, no traceback
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == expected
    assert not (tmp_path / "run").exists()  # nothing loaded or written
    assert elapsed < 120  # seconds of imports, not minutes of loading or a collective's timeout
