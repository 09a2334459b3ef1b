"""Bad input under a real two-process launch: `torchrun --nproc_per_node 2 mixgrpo train ...` (gloo, CPU)
with a setting that only two processes make wrong. Every rank must refuse it on its own (exit status 2,
one error paragraph, no traceback) before any model loads, and the launcher must come back rather than
wait on a rank stuck in a collective."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .conftest import ROOT, TOY

MIXGRPO_CLI = Path(sys.executable).with_name("mixgrpo")  # the console script, as a user runs it


def test_prompts_not_divisible_by_two_processes_stop_every_rank_before_the_model_loads(tmp_path):
    bindings = [*TOY, "TrainConfig.prompts_per_iteration = 3",
                # a model load would fail with another message: the refusal must come first
                "TrainConfig.backbone = 'flux'", "FluxBackbone.path = '/nonexistent/flux'"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           # each rank's output in its own file; a slow poll, so that a rank that exits on its own is
           # reported with its own status rather than killed because the other one exited first
           "--log-dir", str(tmp_path / "logs"), "--redirects", "3", "--monitor-interval", "2",
           "--no-python", str(MIXGRPO_CLI), "train", str(ROOT / "experiments" / "methods" / "mixgrpo.gin"),
           *sum((["--gin", b] for b in bindings), []), "--output", str(tmp_path / "run")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    start = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    elapsed = time.monotonic() - start
    # the launcher came back (no rank hung) and reports both ranks with the CLI's usage-error status
    assert out.returncode != 0, out.stderr[-3000:]
    statuses = {int(r): int(code) for r, code in re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)",
                                                            out.stderr)}
    assert statuses == {0: 2, 1: 2}, out.stderr[-3000:]
    expected = ('mixgrpo train: error: TrainConfig.prompts_per_iteration = 3 is not divisible by the number of '
                'processes (2), so the processes cannot each hold whole groups: set it to a multiple of 2 '
                '(--gin "TrainConfig.prompts_per_iteration = 2" or --gin "TrainConfig.prompts_per_iteration = 4"), '
                'or launch a number of processes that divides 3')
    logs = sorted((tmp_path / "logs").rglob("stderr.log"), key=lambda p: int(p.parent.name))
    assert [int(p.parent.name) for p in logs] == [0, 1]
    for log in logs:  # every rank says it itself: one paragraph, no traceback
        err = log.read_text()
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == expected
    assert not (tmp_path / "run").exists()  # nothing loaded or written
    assert elapsed < 120  # seconds of imports, not minutes of loading or a collective's timeout
