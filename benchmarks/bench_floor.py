"""The floor: what an iteration would cost if it were nothing but its network evaluations.

``per_evaluation_costs`` measures one forward (rollout batch) and one forward+backward (micro batch)
per evaluation and sample; ``add_floors`` multiplies them by each method's counted evaluations, and
``add_ratios`` divides by the floor and by DanceGRPO's row.

Part of ``benchmarks/iteration_time.py`` (the entry point); see docs/benchmarks.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_instruments import Instruments, synchronize
from bench_settings import REFERENCE


def per_evaluation_costs(trainer: Any, inst: Instruments, reps: int) -> dict[str, float]:
    """Seconds per network evaluation and sample: a rollout forward (no grad, rollout batch) and a
    training forward+backward (micro batch), each the fastest of ``reps`` calls after one untimed call."""
    backbone, c = trainer.backbone, trainer.config
    prompts, _, _ = trainer.local_batch(0)
    from mixgrpo.core.rollout import encode_unique

    cond_all = encode_unique(backbone, prompts)
    device = backbone.device
    gen = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        rows = [k % len(prompts) for k in range(n)]
        x = torch.randn(n, *backbone.latent_shape(), generator=gen).to(device)
        return x, torch.full((n,), 0.6, device=device), cond_all.select(rows)

    def timed(fn: Callable[[], None]) -> float:
        fn()  # warm-up (kernels, allocator)
        best = math.inf
        for _ in range(reps):
            synchronize(device)
            inst.rows = 0
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            best = min(best, (time.perf_counter() - t0) / max(inst.rows, 1))
        return best

    x, sigma, cond = batch(min(c.rollout_batch_size, len(prompts)))
    backbone.module.eval()

    def forward() -> None:
        with torch.no_grad():
            backbone.velocity(x, sigma, cond)

    fwd = timed(forward)
    xm, sm, cm = batch(min(c.micro_batch_size, len(prompts)))
    backbone.module.train()

    def forward_backward() -> None:
        v = backbone.velocity(xm, sm, cm)
        v.float().square().mean().backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    fb = timed(forward_backward)
    with torch.no_grad():  # decode a rollout batch too, so that the first timed iteration is warm
        backbone.decode(x.float())
    inst.reset()
    return {"forward_s": fwd, "forward_backward_s": fb}


def describe(trainer: Any) -> dict[str, Any]:
    """The settings a run's backbone and config actually took (recorded with the results)."""
    backbone, c = trainer.backbone, trainer.config
    vae = getattr(backbone, "vae", None)
    return {
        "calls_per_velocity": float(getattr(backbone, "calls_per_velocity", 1)),
        "samples": float(c.prompts_per_iteration * c.group_size),
        "rollout_batch_size": c.rollout_batch_size, "micro_batch_size": c.micro_batch_size,
        "cfg_scale": float(getattr(backbone, "cfg_scale", 1.0)),
        "text_tokens": getattr(backbone, "max_sequence_length", None),
        "vae_dtype": str(vae.dtype).replace("torch.", "") if vae is not None else None,
    }


def add_floors(table: dict[str, dict], costs: dict[str, Any]) -> None:
    """``floor_s`` for every method, in place: samples × ((NFE roll + NFE train without gradients) ×
    one forward + the other NFE train × one forward+backward), each per evaluation and sample. The
    training calls without gradients are the forward-process presets' velocities before the update
    and any reference model's (the KL term). The samples are the method's own (TempFlow-GRPO's group is
    its trunk's branches), else the run's."""
    for row in table.values():
        nograd = row.get("nfe_train_nograd", 0.0)
        row["floor_s"] = row.get("samples", costs["samples"]) * ((row["nfe_rollout"] + nograd) * costs["forward_s"]
                                             + (row["nfe_train"] - nograd) * costs["forward_backward_s"])


def add_ratios(table: dict[str, dict]) -> None:
    """``ratio_to_dancegrpo``, ``ratio_to_floor`` and ``floor_ratio_to_dancegrpo`` (the ratio the
    floors alone predict) for every method, in place; the DanceGRPO ratios are None when DanceGRPO
    was not measured (``--methods``)."""
    ref = table.get(REFERENCE)
    for row in table.values():
        row["ratio_to_dancegrpo"] = row["iteration_s"] / ref["iteration_s"] if ref else None
        row["ratio_to_floor"] = row["iteration_s"] / row["floor_s"]
        row["floor_ratio_to_dancegrpo"] = row["floor_s"] / ref["floor_s"] if ref else None
