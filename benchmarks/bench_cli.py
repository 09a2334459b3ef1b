"""The command line of ``benchmarks/iteration_time.py``: its flags, their checks, and the sweep
points each backbone takes by default.

Part of ``benchmarks/iteration_time.py`` (the entry point); see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_settings import (
    BACKBONES,
    DEFAULT_SWEEPS,
    DTYPES,
    METHODS,
    MOVING_WINDOW,
    PAPER_METHODS,
    PRESET_WINDOW,
    REAL,
    TINY_SWEEPS,
)


def _int_list(text: str, minimum: int, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    return _int_list(text, 1, "values")


def _window_starts(text: str) -> list[int]:
    return _int_list(text, 0, "window starts")


def _methods(text: str) -> list[str]:
    """Comma-separated preset names, or ``all``; returned in the table's order."""
    if text.strip() == "all":
        return list(METHODS)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(METHODS)} "
                                         "(or all)")
    return [m for m in METHODS if m in names]  # the table's order


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The flags of ``argv`` (default ``sys.argv``), checked, with the device and the sweep points
    filled in; ``description`` heads ``--help``."""
    p = build_parser(description)
    args = p.parse_args(argv)
    _check(p, args)
    _fill_sweeps(p, args)
    return args


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every flag, with its default and help (the checks that involve several flags are ``_check``'s)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=BACKBONES, default="toy")
    p.add_argument("--tiny", action="store_true", help="shrink the real architectures (CPU dry run)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="real architectures: default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--steps", type=_positive, default=25, help="T for every method (default 25)")
    p.add_argument("--group-size", type=_positive, default=4)
    p.add_argument("--prompts", type=_positive, default=2)
    p.add_argument("--size", type=_positive, default=None, help="image side in pixels (real architectures)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="0 = full fine-tuning (default: the recipe's, 64 FLUX.1, FLUX.2, Z-Image; 32 SD3.5, "
                        "Qwen-Image)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attention-backend", default=None, metavar="NAME",
                   help="one of diffusers' attention backends, e.g. flash, xformers, _native_flash (default: "
                        "PyTorch SDPA); diffusers backbones only")
    p.add_argument("--compile", choices=("none", "rollout", "all"), default="none",
                   help="torch.compile the transformer's blocks: in the rollout only, or in rollout and "
                        "training (default none); diffusers backbones only")
    p.add_argument("--methods", type=_methods, default=list(PAPER_METHODS),
                   help=f"comma-separated presets to time, or all ({','.join(METHODS)}); default the MixGRPO "
                        f"paper's five: {','.join(PAPER_METHODS)}; the ratios to DanceGRPO need dancegrpo among them")
    p.add_argument("--rollout-batch-size", type=_positive, default=None)
    p.add_argument("--overlap-rewards", action="store_true",
                   help="score each rollout chunk in a background thread while the next one rolls out")
    p.add_argument("--no-share-prefix", action="store_true",
                   help="walk every sample down every step, even the steps a group shares (its ODE steps "
                        "before the first SDE step, and that step's model call): TrainConfig.share_prefix off")
    p.add_argument("--micro-batch-size", type=_positive, default=None)
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per method (default 1)")
    p.add_argument("--iterations", type=_positive, default=2, help="timed iterations per method (default 2)")
    p.add_argument("--at-iteration", type=int, default=0,
                   help="number of the first (warm-up) iteration: where the windows are (default 0; 140 puts "
                        "MixGRPO's window at step 5 and Flash's at 7, about their averages over the paper's run: "
                        "a later window shares more steps per group and, for Flash, compresses fewer)")
    p.add_argument("--sweep-method", choices=METHODS, default="mixgrpo")
    p.add_argument("--sweep-steps", type=_ints, default=None, help="T values, e.g. 10,25,40")
    p.add_argument("--sweep-group", type=_ints, default=None, help="group sizes, e.g. 2,4,8")
    p.add_argument("--sweep-res", type=_ints, default=None, help="image sides, e.g. 512,720,1024")
    p.add_argument("--sweep-window", type=_window_starts, default=None,
                   help="first steps of the window, e.g. 0,5,10,21: the steps a group shares grow with it")
    p.add_argument("--no-sweeps", action="store_true")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the sweep points that would start after this many seconds")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The device (default: cuda when torch sees one) and the checks that involve several flags;
    ``p.error`` exits with the message."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.tiny and args.backbone not in REAL:
        p.error(f"--tiny shrinks the real architectures ({', '.join(REAL)}), not {args.backbone!r}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.at_iteration < 0:
        p.error(f"--at-iteration must be >= 0, got {args.at_iteration}")
    if args.lora_rank is not None and args.lora_rank < 0:
        p.error(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.backbone == "toy" and (args.attention_backend or args.compile != "none"):
        p.error("--attention-backend and --compile apply to the diffusers backbones (shapes and the real "
                "architectures), not to the toy one")
    if args.sweep_method not in args.methods:
        args.no_sweeps = True  # the sweeps reuse the table's row of their method
    if args.backbone not in REAL:
        for flag in ("size", "lora_rank", "dtype"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} applies to the real architectures ({', '.join(REAL)}) only")
        if args.sweep_res:
            p.error("--sweep-res applies to the real architectures only")


def _fill_sweeps(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The sweep points the flags leave out: the backbone's defaults (``--sweep-window``'s: those that
    the sweep method's window reaches at this T), after checking the window starts given."""
    defaults = TINY_SWEEPS if args.tiny else DEFAULT_SWEEPS[args.backbone]
    last_start = args.steps - PRESET_WINDOW  # the presets' windows are 4 steps, clamped at T − 4
    if args.sweep_window is None:  # the default starts that a windowed sweep method reaches at this T
        moving = args.sweep_method in MOVING_WINDOW
        args.sweep_window = [v for v in _window_starts(defaults["window"]) if v <= last_start] if moving else []
    elif args.sweep_window and args.sweep_method not in MOVING_WINDOW:
        p.error(f"--sweep-window needs a method whose window moves ({', '.join(MOVING_WINDOW)}), "
                f"not --sweep-method {args.sweep_method}")
    elif any(v > last_start for v in args.sweep_window):
        p.error(f"--sweep-window {','.join(map(str, args.sweep_window))}: a window of {PRESET_WINDOW} steps "
                f"starts at most at step {last_start} when T = {args.steps}")
    for axis in ("steps", "group", "res"):
        if getattr(args, f"sweep_{axis}") is None:
            setattr(args, f"sweep_{axis}", _ints(defaults[axis]) if defaults[axis] else [])
