"""Iteration time of every method preset, measured in one run, as ratios to DanceGRPO and to each
method's own floor.

    .venv/bin/python benchmarks/iteration_time.py                       # toy backbone, T = 25 (seconds)
    .venv/bin/python benchmarks/iteration_time.py --backbone shapes --group-size 8 --prompts 4
    python benchmarks/iteration_time.py --backbone flux-dev --json flux.json        # one GPU
    python benchmarks/iteration_time.py --backbone flux-dev --tiny --device cpu     # the dry run

Backbones: ``toy``, ``shapes`` (the shipped shapes-world FLUX), and the real architectures with
random weights, ``flux-dev`` (FLUX.1-dev: 19 double + 38 single blocks, width 3072, guidance
embedding, 720x720 through the real VAE, LoRA rank 64, bf16) and ``sd35-medium`` (SD3.5-Medium,
512x512, CFG 4.5, LoRA rank 32, bf16), built from ``benchmarks/configs/`` (see architectures.py;
small stand-in text encoders, since the text side is encoded once per prompt and cached).

Every method runs its preset (``experiments/methods/``) at the same T (default 25, as MixGRPO's
Table 1), without KL, with the ``shapes.preference`` reward (cheap: reward seconds are not those of
HPSv2/PickScore/ImageReward). Per method and iteration it reports rollout, reward, training and
optimizer seconds (the optimizer step is part of training), network evaluations per sample in the
rollout and in training (counted at the network: a CFG call counts 2; the steps a group's samples
share, up to its first SDE step, once per group unless ``--no-share-prefix``), peak memory, and the floor:
the measured cost of one forward (rollout batch) and one forward+backward (micro batch) per
evaluation and sample, times the method's counts. ``iteration / floor`` is the overhead that NFE
accounting does not see (decoding, reward, solver and log-prob math, partial micro-batches).

The paper (MixGRPO Table 1, FLUX on 32 GPUs) reports MixGRPO at 0.52 of DanceGRPO's iteration time,
Flash at 0.39 and Flash* at 0.29.

Sweeps (``--sweep-steps``, ``--sweep-group``, ``--sweep-res``) time one method (``--sweep-method``)
at a few values of T, group size and resolution, one iteration each in the already warm process.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import architectures  # noqa: E402  (benchmarks/architectures.py)

METHODS = ["flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]
REFERENCE = "dancegrpo"
REAL = tuple(architectures.ARCHS)  # flux-dev, sd35-medium
BACKBONES = ("toy", "shapes", *REAL)
# LoRA ranks on one GPU: 64 for FLUX (a single-GPU FLUX set-up), 32 for SD3.5-M (FlowGRPO's).
LORA_RANK = {"flux-dev": 64, "sd35-medium": 32}
DEFAULT_SWEEPS = {
    "toy": {"steps": "10,25,40", "group": "2,4,8", "res": "", "window": "0,10,21"},
    "shapes": {"steps": "10,25,40", "group": "2,4,8", "res": "", "window": "0,5,10,21"},
    "flux-dev": {"steps": "10,25,40", "group": "2,4,8", "res": "512,720,1024", "window": "0,21"},
    "sd35-medium": {"steps": "10,25,40", "group": "2,4,8", "res": "256,512,768", "window": "0,21"},
}
TINY_SWEEPS = {"steps": "12,25", "group": "2,3", "res": "32,48", "window": "0,21"}
PRESET_WINDOW = 4  # the window size of every MixGRPO preset (experiments/methods/)
MOVING_WINDOW = ("mixgrpo", "mixgrpo_flash")  # the presets whose window moves (progressive)


# -- what a run is -----------------------------------------------------------------------------------
class Run:
    """The settings shared by every measurement of one invocation, and the gin bindings they make."""

    def __init__(self, args: argparse.Namespace, model_dir: Path | None) -> None:
        self.backbone = args.backbone
        self.tiny = args.tiny
        self.device = torch.device(args.device)
        self.steps = args.steps
        self.group_size = args.group_size
        self.prompts = args.prompts
        self.warmup = args.warmup
        self.at_iteration = args.at_iteration
        self.iterations = args.iterations
        self.model_dir = model_dir
        self.real = self.backbone in REAL
        self.arch = architectures.load_arch(self.backbone, tiny=self.tiny) if self.real else None
        default_size = architectures.TINY_SIZE if self.tiny else architectures.DEFAULT_SIZE.get(self.backbone)
        self.size = args.size or default_size
        self.dtype = args.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        default_rank = 4 if self.tiny else LORA_RANK.get(self.backbone, 0)
        self.lora_rank = args.lora_rank if args.lora_rank is not None else default_rank
        self.rollout_batch = args.rollout_batch_size
        self.micro_batch = args.micro_batch_size
        self.gradient_checkpointing = args.gradient_checkpointing
        self.attention_backend = args.attention_backend
        self.compile = args.compile
        self.overlap_rewards = args.overlap_rewards
        self.share_prefix = not args.no_share_prefix
        self.methods = args.methods

    def bindings(self, out: str, steps: int | None = None, group_size: int | None = None,
                 size: int | None = None, method: str | None = None) -> list[str]:
        """The bindings after ``method``'s preset. The shapes world's file brings its model, and
        also its demo's window schedule (shifted every 10 iterations, for a 40-iteration run); the
        preset is read again after it so that every backbone times the presets' own schedules."""
        steps, group_size, size = steps or self.steps, group_size or self.group_size, size or self.size
        common = [
            f"TrainConfig.num_steps = {steps}", f"TrainConfig.group_size = {group_size}",
            f"TrainConfig.prompts_per_iteration = {self.prompts}", "TrainConfig.prompt_set = 'shapes'",
            "TrainConfig.rewards = {'shapes.preference': 1.0}", "TrainConfig.eval_rewards = ()",
            "TrainConfig.eval_every = 0", "TrainConfig.sample_every = 0", "TrainConfig.checkpoint_every = 0",
            "TrainConfig.tensorboard = False", "TrainConfig.progress = False", f"TrainConfig.output_dir = '{out}'",
            "TrainConfig.num_minibatches = 1", f"TrainConfig.overlap_rewards = {self.overlap_rewards}",
            f"TrainConfig.share_prefix = {self.share_prefix}",
            "FlowGRPO.kl_beta = 0.0",  # the FLUX recipes compared in the paper train without KL
        ]
        batches = []
        if self.rollout_batch:
            batches.append(f"TrainConfig.rollout_batch_size = {self.rollout_batch}")
        if self.micro_batch:
            batches.append(f"TrainConfig.micro_batch_size = {self.micro_batch}")
        if self.backbone == "toy":
            return ["TrainConfig.backbone = 'toy'", "ToyBackbone.size = 16", "ToyBackbone.hidden = 32",
                    *common, *batches]
        if self.backbone == "shapes":
            preset = [f"include '{ROOT / 'experiments/methods' / method}.gin'"] if method else []
            return [f"include '{ROOT / 'experiments/shapes/world.gin'}'", *preset, *common, *batches,
                    *self.speed_bindings("FluxBackbone")]
        kind = self.arch["backbone"]
        text = self.arch["text"]
        if kind == "flux":
            cls = "FluxBackbone"
            head = [f"include '{ROOT / 'experiments/backbones/flux.gin'}'", f"FLUX_PATH = '{self.model_dir}'"]
        else:
            cls = "SD3Backbone"
            head = [f"include '{ROOT / 'experiments/backbones/sd3.gin'}'", f"SD3_PATH = '{self.model_dir}'"]
        backbone = [
            f"{cls}.dtype = '{self.dtype}'", f"{cls}.height = {size}", f"{cls}.width = {size}",
            f"{cls}.lora_rank = {self.lora_rank}",
            f"{cls}.lora_alpha = {2 * self.lora_rank if self.lora_rank else None}",
            f"{cls}.gradient_checkpointing = {self.gradient_checkpointing}", f"{cls}.device = '{self.device}'",
        ]
        if self.tiny:  # the real lengths come from the backbone's gin file (FLUX 512, SD3.5 128)
            backbone.append(f"{cls}.max_sequence_length = {text['max_sequence_length']}")
        backbone += self.speed_bindings(cls)
        if not self.rollout_batch:
            batches.append("TrainConfig.rollout_batch_size = 4")
        if not self.micro_batch:
            batches.append("TrainConfig.micro_batch_size = 2")
        return [*head, *backbone, *common, *batches]

    def speed_bindings(self, cls: str) -> list[str]:
        """The backbone's speed options (docs/benchmarks.md): diffusers' attention backend, torch.compile."""
        out = [f"{cls}.compile = '{self.compile}'"]
        if self.attention_backend:
            out.append(f"{cls}.attention_backend = '{self.attention_backend}'")
        return out

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Real architectures: components load with random weights on the target device."""
        if not self.real:
            yield
            return
        with architectures.random_weights(self.model_dir, self.device, _DTYPES[self.dtype]):
            yield


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- instruments -------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Instruments:
    """Counts network evaluations (rows through the network, so a CFG call counts 2) in the rollout
    and in training, and times the optimizer step, from outside the trainer.

    The rollout/training boundary is the start of ``Trainer.optimize``: rows before it are rollout
    rows, rows after it training rows (reference-model rows included).
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.device = trainer.backbone.device
        self.rows = 0
        self.rollout_rows: int | None = None
        self.optimizer_s = 0.0
        network = trainer.backbone.unwrapped() if hasattr(trainer.backbone, "unwrapped") else trainer.backbone.module
        self._hook = network.register_forward_pre_hook(self._count, with_kwargs=True)
        trainer.optimize = self._marking(trainer.optimize)
        step = trainer.optimizer.step

        def timed_step(*a: Any, **k: Any) -> Any:
            synchronize(self.device)  # the backward's kernels belong to training, not to the step
            t0 = time.perf_counter()
            out = step(*a, **k)
            synchronize(self.device)
            self.optimizer_s += time.perf_counter() - t0
            return out

        trainer.optimizer.step = timed_step

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states")
        if x is None:
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None:
            x = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.rows += int(x.shape[0])

    def _marking(self, optimize: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.rollout_rows is None:
                self.rollout_rows = self.rows
            return optimize(*args, **kwargs)

        return call

    def reset(self) -> None:
        self.rows, self.rollout_rows, self.optimizer_s = 0, None, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def close(self) -> None:
        self._hook.remove()


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


# -- measuring ---------------------------------------------------------------------------------------
def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_trainer(run: Run, method: str, out: str, **overrides: Any) -> Any:
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
            "trainer_nfe_rollout": m[metrics.NFE_ROLLOUT], "trainer_nfe_train": m[metrics.NFE_TRAIN],
            "reward_mean": m[metrics.reward("shapes.preference", "mean")],
            # the first step of the window (-1: none): where the steps a group shares end
            "window_start": m[metrics.WINDOW_START],
            # optimizer steps the trainer skipped for non-finite gradients (their seconds would be missing)
            "skipped_steps": m.get(metrics.SKIPPED_STEPS, 0.0),
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
    for row in table.values():
        row["floor_s"] = costs["samples"] * (row["nfe_rollout"] * costs["forward_s"]
                                             + row["nfe_train"] * costs["forward_backward_s"])
    add_ratios(table)
    return table, costs


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


def add_ratios(table: dict[str, dict]) -> None:
    """``ratio_to_dancegrpo``, ``ratio_to_floor`` and ``floor_ratio_to_dancegrpo`` (the ratio the
    floors alone predict) for every method, in place; the DanceGRPO ratios are None when DanceGRPO
    was not measured (``--methods``)."""
    ref = table.get(REFERENCE)
    for row in table.values():
        row["ratio_to_dancegrpo"] = row["iteration_s"] / ref["iteration_s"] if ref else None
        row["ratio_to_floor"] = row["iteration_s"] / row["floor_s"]
        row["floor_ratio_to_dancegrpo"] = row["floor_s"] / ref["floor_s"] if ref else None


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
    keep = ("iteration_s", "rollout_s", "train_s", "nfe_rollout", "nfe_train", "peak_mem_gb", "oom")
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


# -- reporting ---------------------------------------------------------------------------------------
def hardware(device: torch.device) -> dict[str, Any]:
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
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(table: dict[str, dict]) -> str:
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


# -- the command line --------------------------------------------------------------------------------
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
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in names]  # the table's order


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=BACKBONES, default="toy")
    p.add_argument("--tiny", action="store_true", help="shrink the real architectures (CPU dry run)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="real architectures: default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--steps", type=_positive, default=25, help="T for every method (default 25)")
    p.add_argument("--group-size", type=_positive, default=4)
    p.add_argument("--prompts", type=_positive, default=2)
    p.add_argument("--size", type=_positive, default=None, help="image side in pixels (real architectures)")
    p.add_argument("--lora-rank", type=int, default=None, help="0 = full fine-tuning (default 64 FLUX, 32 SD3.5)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attention-backend", default=None, metavar="NAME",
                   help="one of diffusers' attention backends, e.g. flash, xformers, _native_flash (default: "
                        "PyTorch SDPA); diffusers backbones only")
    p.add_argument("--compile", choices=("none", "rollout", "all"), default="none",
                   help="torch.compile the transformer's blocks: in the rollout only, or in rollout and "
                        "training (default none); diffusers backbones only")
    p.add_argument("--methods", type=_methods, default=list(METHODS),
                   help=f"comma-separated presets to time (default all: {','.join(METHODS)}); the ratios to "
                        "DanceGRPO need dancegrpo among them")
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
    args = p.parse_args(argv)
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
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.time()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # torch 2.11 + H100: FLUX-sized attention backward through the cuDNN SDPA backend fails with an
        # illegal memory access; the flash / memory-efficient backends do not.
        torch.backends.cuda.enable_cudnn_sdp(False)

    def log(msg: str) -> None:
        print(msg, flush=True)

    with tempfile.TemporaryDirectory() as model_dir:
        run = Run(args, Path(model_dir) if args.backbone in REAL else None)
        settings: dict[str, Any] = {
            "backbone": run.backbone, "tiny": run.tiny, "steps": run.steps, "group_size": run.group_size,
            "prompts": run.prompts, "samples": run.group_size * run.prompts, "warmup": run.warmup,
            "iterations": run.iterations, "at_iteration": run.at_iteration, "reward": "shapes.preference",
            "kl_beta": 0.0, "methods": run.methods, "attention_backend": run.attention_backend,
            "compile": run.compile, "overlap_rewards": run.overlap_rewards, "share_prefix": run.share_prefix,
        }
        if run.real:
            architectures.write_model_dir(run.arch, model_dir)
            settings.update({
                "architecture": architectures.ARCHS[run.backbone], "size": run.size, "dtype": run.dtype,
                "lora_rank": run.lora_rank, "gradient_checkpointing": run.gradient_checkpointing,
                "parameters": architectures.count_parameters(run.arch),
            })
        log(f"backbone={run.backbone}{' (tiny)' if run.tiny else ''}  device={device}  T={run.steps}  "
            f"samples/iteration={run.group_size * run.prompts}  warm-up {run.warmup} + {run.iterations} timed "
            f"from iteration {run.at_iteration}")
        table, costs = measure_methods(run, log)
        settings.update({"rollout_batch_size": costs["rollout_batch_size"],
                         "micro_batch_size": costs["micro_batch_size"],
                         "per_eval_forward_s": costs["forward_s"],
                         "per_eval_forward_backward_s": costs["forward_backward_s"],
                         "calls_per_velocity": costs["calls_per_velocity"], "cfg_scale": costs["cfg_scale"],
                         "max_sequence_length": costs["text_tokens"], "vae_dtype": costs["vae_dtype"]})
        log("\n" + format_table(table))
        result: dict[str, Any] = {m: table[m] for m in run.methods}
        result["hardware"] = hardware(device)
        result["settings"] = settings
        result["sweeps"] = {"method": args.sweep_method}

        def save(sweeps: dict[str, list[dict]]) -> None:
            result["sweeps"] = {"method": args.sweep_method, **sweeps}
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2) + "\n")

        save({})  # the table is on disk before the sweeps start
        if not args.no_sweeps:
            axes = {"steps": args.sweep_steps, "window": args.sweep_window, "resolution": args.sweep_res,
                    "group_size": args.sweep_group}
            axes = {k: v for k, v in axes.items() if v}
            deadline = start + args.budget_s if args.budget_s is not None else None
            sweeps = measure_sweeps(run, args.sweep_method, axes, table, deadline, log, saved=save)
            save(sweeps)
            log(format_sweeps(sweeps, args.sweep_method))
    log(f"\nhardware: {json.dumps(result['hardware'])}\ntotal {time.time() - start:.0f} s")
    if args.json:
        log(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
