"""What the benchmark reports: the printed tables, the JSON's ``settings`` and ``hardware``.

Part of ``benchmarks/iteration_time.py`` (the entry point); see docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

import architectures  # benchmarks/architectures.py
import torch
from bench_settings import Run


def run_settings(run: Run) -> dict[str, Any]:
    """The JSON's ``settings`` that the run fixes before anything is measured."""
    settings: dict[str, Any] = {
        "backbone": run.backbone, "tiny": run.tiny, "steps": run.steps, "group_size": run.group_size,
        "prompts": run.prompts, "samples": run.group_size * run.prompts, "warmup": run.warmup,
        "iterations": run.iterations, "at_iteration": run.at_iteration, "reward": "shapes.preference",
        "methods": run.methods, "attention_backend": run.attention_backend,
        "compile": run.compile, "overlap_rewards": run.overlap_rewards, "share_prefix": run.share_prefix,
    }
    if run.real:
        settings.update({
            "architecture": architectures.ARCHS[run.backbone], "size": run.size, "dtype": run.dtype,
            "lora_rank": run.lora_rank, "gradient_checkpointing": run.gradient_checkpointing,
            "parameters": architectures.count_parameters(run.arch),
        })
    return settings


def cost_settings(costs: dict[str, Any]) -> dict[str, Any]:
    """The JSON's ``settings`` that the trainer took and the floor measured (``measure_methods``' costs)."""
    return {"rollout_batch_size": costs["rollout_batch_size"],
            "micro_batch_size": costs["micro_batch_size"],
            "per_eval_forward_s": costs["forward_s"],
            "per_eval_forward_backward_s": costs["forward_backward_s"],
            "calls_per_velocity": costs["calls_per_velocity"], "cfg_scale": costs["cfg_scale"],
            "max_sequence_length": costs["text_tokens"], "vae_dtype": costs["vae_dtype"]}


def hardware(device: torch.device) -> dict[str, Any]:
    """The JSON's ``hardware``: library versions, the CPU, and the GPU where there is one."""
    import diffusers

    info: dict[str, Any] = {
        "device": device.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "cpu": _cpu_name(), "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda, "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled()})
    return info


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(table: dict[str, dict]) -> str:
    """The printed table: a row per method, its columns as docs/benchmarks.md lists them."""
    head = (f"{'method':<20} {'s/it':>8} {'rollout':>8} {'reward':>7} {'train':>8} {'optim':>7} {'NFE roll':>8} "
            f"{'NFE train':>9} {'floor s':>8} {'x floor':>7} {'x Dance':>7} {'floor x Dance':>13} {'peak GB':>8} "
            f"{'window':>6}")
    lines = [head]

    def ratio(value: float | None, width: int) -> str:
        return f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"

    for method, r in table.items():
        lines.append(
            f"{method:<20} {r['iteration_s']:>8.3f} {r['rollout_s']:>8.3f} {r['reward_s']:>7.3f} {r['train_s']:>8.3f} "
            f"{r['optimizer_s']:>7.3f} {r['nfe_rollout']:>8.2f} {r['nfe_train']:>9.2f} {r['floor_s']:>8.3f} "
            f"{r['ratio_to_floor']:>7.2f} {ratio(r['ratio_to_dancegrpo'], 7)} "
            f"{ratio(r['floor_ratio_to_dancegrpo'], 13)} "
            f"{r['peak_mem_gb']:>8.2f} {_window(r.get('window_start')):>6}")
    return "\n".join(lines)


def _window(start: float | None) -> str:
    """The window's first step as the table prints it: ``-`` for none, a mean as 5.5."""
    if start is None or start < 0:
        return "-"
    return f"{start:g}"


def format_sweeps(sweeps: dict[str, list[dict]], method: str) -> str:
    """The printed sweeps: a small table per axis, each point's time also as a ratio to the first's."""
    lines = []
    for axis, points in sweeps.items():
        note = {"group_size": " (samples = prompts x group size)",
                "window": " start (the steps up to it are shared within a group)"}.get(axis, "")
        lines.append(f"\n{method}: iteration time against {axis}{note} (x first = ratio to the first point's time)")
        lines.append(f"{axis:>12} {'s/it':>8} {'rollout':>8} {'train':>8} {'NFE roll':>8} {'NFE train':>9} "
                     f"{'x first':>7} {'peak GB':>8}")
        base = next((p["iteration_s"] for p in points if "iteration_s" in p), None)
        for p in points:
            if "iteration_s" not in p:
                lines.append(f"{p['value']:>12} {'out of memory' if p.get('oom') else p.get('skipped', '?'):>8}")
                continue
            lines.append(f"{p['value']:>12} {p['iteration_s']:>8.3f} {p['rollout_s']:>8.3f} {p['train_s']:>8.3f} "
                         f"{p['nfe_rollout']:>8.2f} {p['nfe_train']:>9.2f} {p['iteration_s'] / base:>7.2f} "
                         f"{p['peak_mem_gb']:>8.2f}")
    return "\n".join(lines)
