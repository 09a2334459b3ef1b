"""Running the timed rows: a trainer per method preset, its warm-up and timed iterations, and the
sweeps (one iteration of one method at each point of an axis).

Part of ``benchmarks/iteration_time.py`` (the entry point); see docs/benchmarks.md.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_floor import add_floors, add_ratios, describe, per_evaluation_costs
from bench_instruments import Instruments
from bench_settings import ROOT, Run


def _free() -> None:
    """Release what the last trainer held: Python's garbage, then CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_trainer(run: Run, method: str, out: str, **overrides: Any) -> Any:
    """A trainer for ``method``'s preset with the run's bindings (``overrides``: a sweep point's
    ``steps``, ``group_size`` or ``size``), writing into ``out``."""
    from accelerate import Accelerator

    from mixgrpo.core.config import load_config
    from mixgrpo.core.trainer import Trainer

    cfg, pm = load_config(ROOT / "experiments" / "methods" / f"{method}.gin",
                          run.bindings(out, method=method, **overrides))
    accelerator = Accelerator(cpu=run.device.type == "cpu")
    with run.building():
        return Trainer(cfg, pm, accelerator=accelerator)


def time_iterations(trainer: Any, inst: Instruments, warmup: int, iterations: int, first: int = 0,
                    ) -> dict[str, float]:
    """Mean over ``iterations`` timed iterations (after ``warmup`` untimed ones), numbered from ``first``:
    plans are pure functions of the iteration number, so a run can be timed at any point of its schedule."""
    from mixgrpo.core import metrics

    rows = []
    samples = trainer.config.prompts_per_iteration * trainer.config.group_size
    for n in range(warmup + iterations):
        inst.reset()
        m = trainer.iteration(first + n)
        if n < warmup:
            continue
        rollout_rows = inst.rollout_rows if inst.rollout_rows is not None else inst.rows
        rows.append({
            "iteration_s": m[metrics.ITERATION_S], "rollout_s": m[metrics.ROLLOUT_S],
            "reward_s": m[metrics.REWARD_S], "train_s": m[metrics.TRAIN_S], "optimizer_s": inst.optimizer_s,
            "peak_mem_gb": m[metrics.PEAK_MEM_GB],
            "nfe_rollout": rollout_rows / samples, "nfe_train": (inst.rows - rollout_rows) / samples,
            # of those, the calls without gradients: a forward's cost, not a forward+backward's
            "nfe_train_nograd": inst.train_nograd_rows / samples,
            "trainer_nfe_rollout": m[metrics.NFE_ROLLOUT], "trainer_nfe_train": m[metrics.NFE_TRAIN],
            "reward_mean": m[metrics.reward("shapes.preference", "mean")],
            # the first step of the window (-1: none): where the steps a group shares end
            "window_start": m[metrics.WINDOW_START],
            # optimizer steps the trainer skipped for non-finite gradients (their seconds would be missing)
            "skipped_steps": m.get(metrics.SKIPPED_STEPS, 0.0),
            # the share of samples that replayed a stored trajectory (OP-GRPO; 0 for the on-policy presets)
            "replay_fraction": m.get(metrics.REPLAY_FRACTION, 0.0),
            # the iteration's samples: the run's prompts x group, or a preset's own group (TempFlow-GRPO's trunk)
            "samples": float(samples),
        })
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    out["peak_mem_gb"] = max(r["peak_mem_gb"] for r in rows)
    return out


def measure_methods(run: Run, log: Callable[[str], None]) -> tuple[dict[str, dict], dict[str, float]]:
    """Every preset at the run's settings. The per-evaluation costs are measured on the first
    method's backbone (before its iterations, which they also warm up) and again on the last one's
    (after its iterations); the floors use the faster of the two, so that a burst of load from
    elsewhere during one short measurement does not raise them."""
    table: dict[str, dict] = {}
    costs: dict[str, Any] = {}
    for method in run.methods:
        with tempfile.TemporaryDirectory() as out:
            trainer = build_trainer(run, method, out)
            inst = Instruments(trainer)
            if not costs:
                costs = per_evaluation_costs(trainer, inst, reps=5)
                costs.update(describe(trainer))
            row = time_iterations(trainer, inst, run.warmup, run.iterations, first=run.at_iteration)
            # the KL weight the preset trains with (the run binds FlowGRPO's to 0; AWM's preset keeps its own)
            row["kl_beta"] = float(getattr(trainer.objective, "kl_beta", 0.0))
            if method == run.methods[-1]:
                again = per_evaluation_costs(trainer, inst, reps=5)
                for key in ("forward_s", "forward_backward_s"):
                    costs[key] = min(costs[key], again[key])
            inst.close()
            del trainer, inst
            _free()
        table[method] = row
        log(f"measured {method}: {row['iteration_s']:.3f} s/iteration"
            + (f"; WARNING: {row['skipped_steps']:.0f} optimizer step(s) skipped (non-finite)"
               if row["skipped_steps"] else ""))
    log(f"per evaluation and sample: forward {costs['forward_s'] * 1e3:.2f} ms, "
        f"forward+backward {costs['forward_backward_s'] * 1e3:.2f} ms")
    add_floors(table, costs)
    add_ratios(table)
    return table, costs


def measure_sweeps(run: Run, method: str, axes: dict[str, list[int]], table: dict[str, dict],
                   deadline: float | None, log: Callable[[str], None],
                   saved: Callable[[dict[str, list[dict]]], None] = lambda sweeps: None) -> dict[str, list[dict]]:
    """One iteration of ``method`` at each point of each axis (``steps``, ``group_size``, ``resolution``,
    ``window``: the first step of the window, timed at the first iteration of the schedule that puts it
    there); the point at the run's own setting is the method's row of ``table`` (``"from": "table"``).
    ``saved`` receives the sweeps so far after every point (so a run stopped from outside keeps them)."""
    sweeps: dict[str, list[dict]] = {}
    key = {"steps": "steps", "group_size": "group_size", "resolution": "size"}
    own_window = table.get(method, {}).get("window_start")
    base = {"steps": run.steps, "group_size": run.group_size, "resolution": run.size,
            "window": int(own_window) if own_window is not None else None}
    keep = ("iteration_s", "rollout_s", "train_s", "nfe_rollout", "nfe_train", "nfe_train_nograd", "peak_mem_gb",
            "oom")
    for axis, values in axes.items():
        points = sweeps[axis] = []
        for value in values:
            if value == base[axis] and method in table:
                row = {k: v for k, v in table[method].items() if k in keep}
                points.append({"value": value, "from": "table", **row})
                continue
            if deadline is not None and time.time() > deadline:
                points.append({"value": value, "skipped": "time budget"})
                log(f"sweep {axis}={value}: skipped (time budget)")
                continue
            trainer = inst = None
            try:
                with tempfile.TemporaryDirectory() as out:
                    trainer = build_trainer(run, method, out, **({key[axis]: value} if axis in key else {}))
                    first = iteration_with_window(trainer, value) if axis == "window" else run.at_iteration
                    inst = Instruments(trainer)
                    row = time_iterations(trainer, inst, warmup=0, iterations=1, first=first)
            except torch.OutOfMemoryError:
                row = {"oom": True}
            finally:
                if inst is not None:
                    inst.close()
                trainer = inst = None  # release the model before the next point is built
                _free()
            points.append({"value": value, **{k: v for k, v in row.items() if k in keep}})
            saved(sweeps)
            log(f"sweep {axis}={value}: " + (f"{row['iteration_s']:.3f} s/iteration" if "iteration_s" in row
                                              else "out of memory"))
    return sweeps


def iteration_with_window(trainer: Any, start: int, horizon: int = 100_000) -> int:
    """The first iteration whose plan puts the window's first step at ``start`` (plans are pure
    functions of the iteration, so the search costs no model call)."""
    c = trainer.config
    for k in range(horizon):
        window = trainer.schedule.plan(k, c.num_steps, c.prompts_per_iteration * c.group_size, seed=c.seed).window
        if window is None:
            raise ValueError(f"the {c.schedule!r} schedule has no window: --sweep-window needs a windowed "
                             "--sweep-method (mixgrpo, mixgrpo_flash)")
        if window[0] == start:
            return k
    raise ValueError(f"the {c.schedule!r} schedule never starts its window at step {start} in {horizon} "
                     f"iterations (T = {c.num_steps}): choose starts it reaches, e.g. 0")
