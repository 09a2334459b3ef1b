"""Iteration time of every method preset, measured in one run, as ratios to DanceGRPO and to each
method's own floor.

    .venv/bin/python benchmarks/iteration_time.py                       # toy backbone, T = 25 (seconds)
    .venv/bin/python benchmarks/iteration_time.py --backbone shapes --group-size 8 --prompts 4
    python benchmarks/iteration_time.py --backbone flux-dev --json flux.json        # one GPU
    python benchmarks/iteration_time.py --backbone flux-dev --tiny --device cpu     # the dry run

Backbones: ``toy``, ``shapes`` (the shipped shapes-world FLUX), and the real architectures with
random weights, ``flux-dev`` (FLUX.1-dev: 19 double + 38 single blocks, width 3072, guidance
embedding, 720x720 through the real VAE, LoRA rank 64, bf16), ``sd35-medium`` (SD3.5-Medium,
512x512, CFG 4.5, LoRA rank 32, bf16), ``sd35-large`` (SD3.5-Large, 512x512, CFG 3.5, rank 32),
``qwen-image`` (Qwen-Image 20B, 512x512, true CFG 4, rank 32), ``flux2-klein`` (FLUX.2-klein-4B base,
384x384, CFG 4, rank 64) and ``z-image`` (Z-Image 6B, 512x512, guidance 4, rank 64), each through its
family's gin file, built from ``benchmarks/configs/`` (see architectures.py; small stand-in text
encoders, since the text side is encoded once per prompt and cached).

Every method runs its preset (``experiments/methods/``) at the same T (default 25, as MixGRPO's
Table 1): by default the paper's five, with ``--methods all`` also Flow-GRPO-Fast, DiffusionNFT,
AWM and OP-GRPO (drawing the same prompts every iteration, so that after the first each group replays
one stored sample). The GRPO presets train without KL (AWM keeps its preset's), with the ``shapes.preference``
reward (cheap: reward seconds are not those of HPSv2/PickScore/ImageReward). Per method and
iteration it reports rollout, reward, training and optimizer seconds (the optimizer step is part of
training), network evaluations per sample in the rollout and in training (counted at the network: a
CFG call counts 2; the steps a group's samples share, up to its first SDE step, once per group
unless ``--no-share-prefix``), peak memory, and the floor: the measured cost of one forward (rollout
batch) and one forward+backward (micro batch) per evaluation and sample, times the method's counts.
``iteration / floor`` is the overhead that NFE accounting does not see (decoding, reward, solver and
log-prob math, partial micro-batches).

The paper (MixGRPO Table 1, FLUX on 32 GPUs) reports MixGRPO at 0.52 of DanceGRPO's iteration time,
Flash at 0.39 and Flash* at 0.29.

Sweeps (``--sweep-steps``, ``--sweep-group``, ``--sweep-res``) time one method (``--sweep-method``)
at a few values of T, group size and resolution, one iteration each in the already warm process.
"""

# This file is the entry point (`make bench`, benchmarks/gpu.sh); the pieces live beside it:
#   bench_cli.py          the flags, their checks and the default sweep points
#   bench_settings.py     the presets and backbones, and Run: one invocation's settings and gin bindings
#   bench_instruments.py  NFE counted at the network, the optimizer step timed, from outside the trainer
#   bench_measure.py      a trainer per preset, its timed iterations, and the sweeps
#   bench_floor.py        the floor (per-evaluation costs x counted NFE) and the ratios
#   bench_report.py       the printed tables and the JSON's settings and hardware
#   architectures.py      the real architectures (FLUX.1, SD3.5, Qwen-Image, FLUX.2-klein, Z-Image), random weights

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import architectures  # noqa: E402  (benchmarks/architectures.py)
import bench_cli  # noqa: E402
from bench_floor import add_ratios  # noqa: E402
from bench_measure import build_trainer, iteration_with_window, measure_methods, measure_sweeps  # noqa: E402
from bench_report import cost_settings, format_sweeps, format_table, hardware, run_settings  # noqa: E402
from bench_settings import METHODS, REAL, ROOT, Run  # noqa: E402

# What tests/benchmarks and other callers use from here.
__all__ = ["METHODS", "ROOT", "Run", "add_ratios", "build_trainer", "iteration_with_window", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> Any:
    """The command line (see ``bench_cli.parse_args``), with this docstring as ``--help``'s description."""
    return bench_cli.parse_args(argv, description=__doc__)


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Time every method of ``--methods`` (then the sweeps), print the tables, and return the results
    (written to ``--json`` too: the table before the sweeps start, then after every sweep point)."""
    args = parse_args(argv)
    start = time.time()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # torch 2.11 + H100: FLUX-sized attention backward through the cuDNN SDPA backend fails with an
        # illegal memory access; the flash / memory-efficient backends do not.
        torch.backends.cuda.enable_cudnn_sdp(False)

    with tempfile.TemporaryDirectory() as model_dir:
        run = Run(args, Path(model_dir) if args.backbone in REAL else None)
        if run.real:
            architectures.write_model_dir(run.arch, model_dir)
        settings = run_settings(run)
        _log(f"backbone={run.backbone}{' (tiny)' if run.tiny else ''}  device={device}  T={run.steps}  "
             f"samples/iteration={run.group_size * run.prompts}  warm-up {run.warmup} + {run.iterations} timed "
             f"from iteration {run.at_iteration}")
        table, costs = measure_methods(run, _log)
        settings.update(cost_settings(costs))
        _log("\n" + format_table(table))
        result: dict[str, Any] = {m: table[m] for m in run.methods}
        result["hardware"] = hardware(device)
        result["settings"] = settings

        def save(sweeps: dict[str, list[dict]]) -> None:
            result["sweeps"] = {"method": args.sweep_method, **sweeps}
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2) + "\n")

        save({})  # the table is on disk before the sweeps start
        if not args.no_sweeps:
            sweeps = _sweeps(args, run, table, start, save)
            save(sweeps)
            _log(format_sweeps(sweeps, args.sweep_method))
    _log(f"\nhardware: {json.dumps(result['hardware'])}\ntotal {time.time() - start:.0f} s")
    if args.json:
        _log(f"wrote {args.json}")
    return result


def _sweeps(args: Any, run: Run, table: dict[str, dict], start: float,
            save: Callable[[dict[str, list[dict]]], None]) -> dict[str, list[dict]]:
    """The sweeps the flags ask for (axes without points are left out), within ``--budget-s`` of ``start``."""
    axes = {"steps": args.sweep_steps, "window": args.sweep_window, "resolution": args.sweep_res,
            "group_size": args.sweep_group}
    axes = {k: v for k, v in axes.items() if v}
    deadline = start + args.budget_s if args.budget_s is not None else None
    return measure_sweeps(run, args.sweep_method, axes, table, deadline, _log, saved=save)


if __name__ == "__main__":
    main()
