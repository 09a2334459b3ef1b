"""FSDP full fine-tuning on two CPU processes (torchrun, gloo) with PyTorch's FSDP2, the code path a
GPU run launched with experiments/accelerate/fsdp.yaml takes: the same advantages and the same update
as one process, parameters really sharded, gradient checkpointing under FSDP, and checkpoints that
move between an FSDP run and a one-process run in both directions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.plugins.backbones.tiny import build_tiny_flux

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _run(tmp: Path, parallelism: str, flux_dir: Path, run: Path, iterations: int, *flags: str,
         processes: int | None = None) -> list[dict]:
    """One run of the worker: FSDP on two processes, DDP on one unless ``processes`` says otherwise."""
    processes = processes or (2 if parallelism == "fsdp" else 1)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [str(WORKER), parallelism, str(flux_dir), str(run), str(iterations), *flags]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, *args] if processes > 1 else [sys.executable, *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert out.returncode == 0, out.stderr[-4000:]
    return [torch.load(run / f"rank{r}.pt") for r in range(processes)]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Equal to a tenth of one AdamW step (the learning rate, 1e-4): the runs batch their model calls
    differently (a process holds half the groups), and the tiny model's rewards differ by ~1e-7, so
    z-scored advantages and the few near-zero gradients Adam normalises carry rounding of ~1e-6."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    flux_dir = build_tiny_flux(tmp / "flux")
    single = _run(tmp, "ddp", flux_dir, tmp / "single", 2)  # one process, 2 iterations, checkpoint each
    # two processes, 1 iteration, checkpoint; gradient checkpointing on (the update must not change)
    sharded = _run(tmp, "fsdp", flux_dir, tmp / "sharded", 1, "--checkpointing")
    # the FSDP checkpoint continued by one process, and by FSDP itself
    shutil.copytree(tmp / "sharded" / "checkpoints", tmp / "continued" / "checkpoints")
    continued = _run(tmp, "ddp", flux_dir, tmp / "continued", 2, "--resume")
    shutil.copytree(tmp / "sharded" / "checkpoints", tmp / "sharded_resumed" / "checkpoints")
    sharded_resumed = _run(tmp, "fsdp", flux_dir, tmp / "sharded_resumed", 2, "--resume")
    return {"tmp": tmp, "single": single, "sharded": sharded, "continued": continued,
            "sharded_resumed": sharded_resumed}


def test_fsdp_matches_one_process(runs):
    single, ranks = runs["single"][0], runs["sharded"]
    assert [r["parallelism"] for r in ranks] == ["fsdp", "fsdp"] and ranks[0]["world"] == 2
    advantages = {**ranks[0]["advantages"], **ranks[1]["advantages"]}
    assert set(ranks[0]["advantages"]).isdisjoint(ranks[1]["advantages"])  # whole groups per process
    # the tiny model's rewards differ by ~1e-7 within a group, so z-scores amplify the rounding of
    # batching (measured in one process: 2.3e-5 between the shared prefix walked for both groups in one
    # call and one group per call); a wrong group is off by ~1
    assert advantages == pytest.approx(single["advantages"], abs=1e-4)
    # the update after one iteration equals the one-process run's (its checkpoint at iteration 1)
    names = ranks[0]["names"]
    one = load_file(str(runs["tmp"] / "single" / "checkpoints" / "iter_000001" / "model.safetensors"))
    _close(ranks[0]["weights"], [one[n] for n in names])
    _close(ranks[1]["weights"], ranks[0]["weights"])


def test_fsdp_evaluates_and_draws_like_one_process(runs):
    from mixgrpo.core.records import read_rows

    sharded = read_rows(runs["tmp"] / "sharded" / "metrics.jsonl")
    single = read_rows(runs["tmp"] / "single" / "metrics.jsonl")
    for a, b in zip(sharded, single[: len(sharded)]):
        assert a["eval/shapes.preference/mean"] == pytest.approx(b["eval/shapes.preference/mean"], abs=1e-5)
    assert sorted(p.name for p in (runs["tmp"] / "sharded" / "samples").iterdir()) == [
        "iter_000000.png", "iter_000001.png"]


def test_fsdp_really_shards_the_parameters(runs):
    ranks = runs["sharded"]
    for (sharded0, local0, full), (sharded1, local1, _) in zip(ranks[0]["shards"], ranks[1]["shards"]):
        assert sharded0 and sharded1
        assert local0 + local1 == full  # split between the two processes, nothing replicated
        if full >= 2:
            assert max(local0, local1) < full


def test_fsdp_checkpoint_resumes_in_one_process_and_under_fsdp(runs):
    single = runs["single"][0]["weights"]
    _close(runs["continued"][0]["weights"], single)  # FSDP checkpoint → one process → iteration 2
    _close(runs["sharded_resumed"][0]["weights"], single)  # FSDP checkpoint → FSDP → iteration 2
    saved = load_file(str(runs["tmp"] / "sharded" / "checkpoints" / "iter_000001" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())  # whole fp32 master weights, gathered


def test_ddp_with_gradient_checkpointing_matches_one_process(runs):
    ranks = _run(runs["tmp"], "ddp", runs["tmp"] / "flux", runs["tmp"] / "ddp2", 1, "--checkpointing", processes=2)
    one = load_file(str(runs["tmp"] / "single" / "checkpoints" / "iter_000001" / "model.safetensors"))
    for r in ranks:
        assert r["world"] == 2 and r["parallelism"] == "ddp" and not any(s[0] for s in r["shards"])
        _close(r["weights"], [one[n] for n in r["names"]])


def test_fsdp_computes_in_bf16_over_fp32_master_weights(runs):
    """The GPU recipe (bf16 compute, fp32 shards, fp32 gradient reduction) on two CPU processes: the
    shards stay fp32 and the update follows the one-process bf16 run (autocast) to bf16 precision."""
    tmp = runs["tmp"]
    ranks = _run(tmp, "fsdp", tmp / "flux", tmp / "fsdp_bf16", 1, "--bf16")
    single = _run(tmp, "ddp", tmp / "flux", tmp / "single_bf16", 1, "--bf16")[0]
    base = load_file(str(tmp / "flux" / "transformer" / "diffusion_pytorch_model.safetensors"))
    sharded = torch.cat([(w - base[n]).flatten() for n, w in zip(ranks[0]["names"], ranks[0]["weights"])])
    alone = torch.cat([(w - base[n]).flatten() for n, w in zip(single["names"], single["weights"])])
    assert all(w.dtype == torch.float32 for w in ranks[0]["weights"])
    assert (sharded != 0).float().mean() > 0.9  # the steps landed on the fp32 shards
    assert torch.nn.functional.cosine_similarity(sharded, alone, dim=0) > 0.9
