"""Two CPU processes (torchrun, gloo) give the same advantages and the same update as one process
holding the whole batch: groups stay whole on a process, rewards are gathered for statistics
(FlowGRPO's global std included), and DDP averages the gradients."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(cmd, tmp):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("method", ["mixgrpo", "flowgrpo", "op_grpo"])
def test_two_processes_match_one(tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _run([sys.executable, str(WORKER), method, str(one)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(WORKER), method, str(two)], tmp_path)
    single = torch.load(one / "rank0.pt")
    ranks = [torch.load(two / f"rank{r}.pt") for r in (0, 1)]
    assert single["world"] == 1 and ranks[0]["world"] == 2
    # whole groups per process, disjoint, covering the batch
    groups = [set(r["group_ids"].tolist()) for r in ranks]
    assert groups[0].isdisjoint(groups[1]) and groups[0] | groups[1] == set(single["group_ids"].tolist())
    adv_single = dict(zip(single["sample_ids"].tolist(), single["advantages"].tolist()))
    for r in ranks:
        for sid, adv in zip(r["sample_ids"].tolist(), r["advantages"].tolist()):
            assert adv == pytest.approx(adv_single[sid], abs=1e-5)
    for w0, w1, ws in zip(ranks[0]["weights"], ranks[1]["weights"], single["weights"]):
        torch.testing.assert_close(w0, w1)  # DDP kept the replicas identical
        torch.testing.assert_close(w0, ws, atol=1e-5, rtol=1e-4)  # and equal to one process
    if method == "op_grpo":  # OP-GRPO's second iteration replayed one sample per group from the buffer,
        assert single["replayed"] == ranks[0]["replayed"] == pytest.approx(1 / 3)
        for r in ranks:  # which every process holds whole, as one process would
            assert list(r["buffer"]) == list(single["buffer"])
            for prompt, (reward, iteration, states, log_prob) in r["buffer"].items():
                reward1, iteration1, states1, log_prob1 = single["buffer"][prompt]
                assert (iteration, reward) == (iteration1, pytest.approx(reward1, abs=1e-5))
                torch.testing.assert_close(states, states1, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(log_prob, log_prob1, atol=1e-4, rtol=1e-4)
