"""A run directory's records, kept honest across interruptions and resumes.

* A new run never writes into a directory that already holds one: ``--resume`` continues it,
  ``--overwrite`` deletes its records and checkpoints first.
* ``bindings.json`` keeps every gin binding of the run as it goes on, ``launch.json`` the experiment
  file and the command-line bindings it was started (and resumed) with. A resumed run's settings
  are the run's own with only the bindings given at the resume layered on top (``mixgrpo train RUN
  --resume`` takes them from ``bindings.json``; ``mixgrpo train FILE.gin --resume`` from the file
  and the recorded command-line bindings). Settings that only say how long to run, how often to
  evaluate or save, where the models are, or the optimiser's step sizes may change, and are
  printed, applied and recorded in ``resumes.jsonl``; any other difference changes the experiment,
  and the resume is refused with the list of differing bindings. A binding set to its default is
  the same setting as no binding.
* On resume, rows of ``metrics.jsonl`` and ``eval_scores.jsonl`` after the checkpoint's iteration
  (written by iterations the checkpoint does not hold, which will run again) are dropped, and
  TensorBoard is told to purge its events from that step on, so no iteration is ever recorded twice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gin

log = logging.getLogger(__name__)
#: what ``Trainer.train`` may do with a run directory that already holds a run
START_MODES = ("new", "resume", "overwrite")
BINDINGS = "bindings.json"
LAUNCH = "launch.json"
RESUMES = "resumes.jsonl"
METRICS = "metrics.jsonl"
EVAL_SCORES = "eval_scores.jsonl"
#: what a run directory holds (``--overwrite`` removes exactly these)
RUN_FILES = ("config.gin", BINDINGS, LAUNCH, RESUMES, METRICS, EVAL_SCORES, "README.md", "reward_curve.png",
             "trackers.json")
RUN_FOLDERS = ("checkpoints", "samples", "tensorboard", "wandb", "eval")

#: how an iteration names its checkpoint folder and its sample grid (``iter_000040``), and the pattern
#: that finds them
ITERATION_GLOB = "iter_*"


def iteration_name(iteration: int) -> str:
    """``iter_000040`` for iteration 40: the name of its checkpoint folder and sample grid."""
    return f"iter_{int(iteration):06d}"


#: TrainConfig fields a resume may change: they do not change what an iteration computes (share_prefix:
#: beyond float rounding)
RESUMABLE_FIELDS = ("iterations", "eval_every", "sample_every", "checkpoint_every", "keep_last", "progress",
                    "tensorboard", "trackers", "tracker_project", "method", "learning_rate", "weight_decay",
                    "max_grad_norm", "max_failed_iterations", "output_dir", "ratio_tolerance", "overlap_rewards",
                    "share_prefix")


#: a binding whose name holds one of these may change on resume: where files live, which device runs a
#: model, and how a reward client talks to its server (none changes a score)
RESUMABLE_WORDS = ("path", "checkpoint", "device", "url", "patience", "timeout", "retries", "backoff")


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked; the message says what to do."""


class StorageError(RuntimeError):
    """The run could not write its records or checkpoints (a full, read-only or forbidden disk)."""


STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM)


def free_space(path: Path) -> str:
    """Free space on the filesystem holding ``path`` (or its nearest existing parent), readable."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            free = shutil.disk_usage(candidate).free
            for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
                if free < 1024 or unit == "TiB":
                    return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
                free /= 1024
    return "unknown"


@contextlib.contextmanager
def storage_errors(out: Path) -> Iterator[None]:
    """Turn a failed write under ``out`` into a ``StorageError`` that names the path, the free space
    and the last good checkpoint; a checkpoint whose write failed is removed (it was never pointed
    to by ``latest``, so resume never sees it)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        from mixgrpo.core import checkpoint as ckpt

        for partial in (out / "checkpoints").glob(".tmp_iter_*"):
            shutil.rmtree(partial, ignore_errors=True)
        where = Path(exc.filename or out)
        try:
            good = ckpt.latest(out / "checkpoints")
        except OSError:
            good = None
        last = f"the last good checkpoint is {good}" if good else "no checkpoint was written"
        raise StorageError(f"cannot write {where}: {exc.strerror} ({free_space(where)} free on that filesystem); "
                           f"{last}. Free space or choose a writable --output, then continue with --resume"
                           ) from None


def snapshot() -> dict[str, str]:
    """Every binding of the parsed gin config, as ``{"Selector.param": repr(value)}`` (macros as
    ``"%NAME"``)."""
    out = {}
    for (scope, selector), params in gin.config._CONFIG.items():
        for param, value in params.items():
            if selector == "gin.macro":
                key = f"%{scope}"
            else:
                key = f"{scope}/{selector}.{param}" if scope else f"{selector}.{param}"
            out[key] = repr(value)
    return out


def resumable(key: str) -> bool:
    """Whether a binding may change on resume: the run-length and bookkeeping fields of TrainConfig,
    where files live (a binding or macro naming a path), which device a model runs on, and a reward
    client's patience with its server (``RESUMABLE_WORDS``)."""
    name = key.rsplit("/", 1)[-1]
    owner, _, param = name.rpartition(".")
    if owner.rpartition(".")[2] == "TrainConfig" and param in RESUMABLE_FIELDS:
        return True
    lowered = name.lower()
    return any(word in lowered for word in RESUMABLE_WORDS)


def default_repr(key: str) -> str | None:
    """``repr`` of the default value of the parameter a binding key names (``scope/Selector.param``),
    or None when the parameter has no default (or is not a known configurable's)."""
    if key.startswith("%"):
        return None
    selector, _, param = key.rpartition("/")[2].rpartition(".")
    try:
        configurable = gin.config._REGISTRY.get_match(selector)
    except (KeyError, ValueError):
        return None
    if configurable is None:
        return None
    import inspect

    target = configurable.wrapped
    try:
        signature = inspect.signature(target.__init__ if inspect.isclass(target) else target)
    except (TypeError, ValueError):
        return None
    found = signature.parameters.get(param)
    if found is None or found.default is inspect.Parameter.empty:
        return None
    return repr(found.default)


def diff(old: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """The bindings whose values differ; a binding missing on one side stands for its parameter's
    default, so that binding a parameter to its default is no change (``ema_decay: None -> None``)."""
    changed = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            default = default_repr(key)
            if default is not None and (a or default) == (b or default):
                continue
        if a != b:
            changed[key] = (a, b)
    return changed


def format_changes(changed: dict[str, tuple[str | None, str | None]]) -> list[str]:
    """One ``key: old -> new`` line per change, the selector's module path dropped; an unbound side
    reads ``default``."""
    def short(key: str) -> str:
        scope, _, name = key.rpartition("/")
        owner, _, param = name.rpartition(".")
        return f"{scope + '/' if scope else ''}{owner.rpartition('.')[2]}.{param}" if owner else key

    return [f"{short(k)}: {'(default)' if old is None else old} -> {'(default)' if new is None else new}"
            for k, (old, new) in changed.items()]


def holds_a_run(out: Path) -> bool:
    return (out / METRICS).is_file() or (out / "checkpoints").is_dir()


def refuse_existing_run(out: Path) -> None:
    """A ``RunDirectoryError`` when ``out`` already holds a run (a new run needs --resume or --overwrite)."""
    if holds_a_run(out):
        rows = len(read_rows(out / METRICS))
        raise RunDirectoryError(
            f"run directory {out} already holds a run ({rows} rows in {METRICS}"
            f"{', and checkpoints' if (out / 'checkpoints').is_dir() else ''}): continue it with --resume, "
            f"start over with --overwrite (deletes its records and checkpoints), or choose another --output")


def prepare_new(out: Path) -> None:
    """Start a fresh run in ``out``: remove what an earlier run left there, record the bindings."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / BINDINGS).write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")


def check_resume(out: Path) -> dict[str, tuple[str | None, str | None]]:
    """The bindings that changed since the run started, when all of them may change on resume;
    otherwise a ``RunDirectoryError`` listing those that may not."""
    file = out / BINDINGS
    if not file.is_file():
        return {}  # a run from before bindings were recorded: nothing to compare against
    changed = diff(json.loads(file.read_text()), snapshot())
    refused = {k: v for k, v in changed.items() if not resumable(k)}
    if refused:
        lines = "; ".join(format_changes(refused))
        raise RunDirectoryError(
            f"cannot resume {out}: the config differs from the run's in bindings that change the experiment "
            f"({lines}). Resume with the run's own settings (`mixgrpo train {out} --resume`, with --gin for "
            f"what may change), or start a new run with another --output. A resume may change only "
            f"{', '.join(RESUMABLE_FIELDS)}, paths and reward-server settings (URL, patience, timeout, retries).")
    return changed


def recorded_bindings(out: Path) -> list[str]:
    """The run's bindings (``bindings.json``) as gin binding lines, to parse the run's own config."""
    file = out / BINDINGS
    if not file.is_file():
        raise RunDirectoryError(f"{out} has no {BINDINGS} (a run from before bindings were recorded, or not a run "
                                f"directory): resume it with its experiment file, `mixgrpo train FILE.gin "
                                f"--output {out} --resume`")
    return [f"{key.lstrip('%')} = {value}" for key, value in json.loads(file.read_text()).items()]


def read_launch(out: Path) -> dict[str, Any] | None:
    """``{"config": file, "gin": [command-line bindings], "output": --output}`` the run was started and
    resumed with, or None for a run from before they were recorded."""
    file = out / LAUNCH
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    return {"config": data.get("config"), "gin": [str(b) for b in data.get("gin", [])], "output": data.get("output")}


def write_launch(out: Path, launch: dict[str, Any]) -> None:
    (out / LAUNCH).write_text(json.dumps(launch, indent=1) + "\n")


def check_writable(out: Path) -> None:
    """The run directory exists or can be created, and takes files; otherwise a ``RunDirectoryError``
    that names it as the run directory (checked before any model loads)."""
    import os

    probe = out / f".write_test_{os.getpid()}"
    try:
        with storage_errors(out):  # a full, read-only or forbidden disk: the storage message
            out.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
    except OSError as exc:
        raise RunDirectoryError(f"cannot use {out} as the run directory (--output, or TrainConfig.output_dir): "
                                f"{exc.strerror or exc}. Choose a folder you can write to") from None


def require_run(out: Path) -> None:
    """A ``RunDirectoryError`` when ``--resume`` names a directory that holds no run."""
    if not holds_a_run(out):
        what = "does not exist" if not out.exists() else f"holds no run (no {METRICS}, no checkpoints)"
        raise RunDirectoryError(f"--resume: {out} {what}, so there is nothing to continue: drop --resume to start "
                                f"a new run there")


def record_resume(out: Path, iteration: int, changed: dict[str, tuple[str | None, str | None]]) -> None:
    """Note the resume and what it changed; the bindings file then describes the run as it goes on."""
    with open(out / RESUMES, "a") as f:
        f.write(json.dumps({"iteration": iteration, "changed": {k: list(v) for k, v in changed.items()}}) + "\n")
    if changed:
        (out / BINDINGS).write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")


def describe_resume(out: Path, iteration: int, changed: dict[str, tuple[str | None, str | None]]) -> str:
    """What a resume prints before its first iteration: where it continues, and every change."""
    if not changed:
        return f"resuming {out} after iteration {iteration} with the run's own settings"
    lines = "\n".join(f"  {line}" for line in format_changes(changed))
    return f"resuming {out} after iteration {iteration}; changed (recorded in {RESUMES}):\n{lines}"


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: dropped, its iteration runs again
            continue
    return rows


def truncate_after(out: Path, iteration: int) -> None:
    """Keep only the rows of iterations <= ``iteration`` (the checkpoint's) in the run's jsonl records."""
    for name in (METRICS, EVAL_SCORES):
        path = out / name
        if path.is_file():
            kept = [r for r in read_rows(path) if int(r.get("iteration", 0)) <= iteration]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(path)


def open_run(out: Path, start: str, accelerator: Any, restore: Callable[[Path], int],
             launch: dict[str, Any] | None = None) -> int:
    """Check and prepare the run directory for ``start`` (one of ``START_MODES``); returns the
    iteration to start from. ``"new"`` refuses a directory that holds a run, ``"overwrite"``
    deletes it first, ``"resume"`` checks the config against the run's (before anything is loaded:
    a refused resume changes nothing), then ``restore(checkpoints)`` loads the latest checkpoint on
    every process and returns its iteration. Writes ``config.gin`` and ``launch`` (when given)."""
    from mixgrpo.core import checkpoint as ckpt

    root, first, main = out / "checkpoints", 0, accelerator.is_main_process
    if start not in START_MODES:
        raise ValueError(f"start must be one of {', '.join(START_MODES)}, got {start!r}")
    if start == "resume":
        require_run(out)  # nothing to continue is a mistake, not a silent fresh start
    if start == "resume" and ckpt.latest(root) is not None:
        changed = check_resume(out)
        first = restore(root)
        if main:
            truncate_after(out, first)
            record_resume(out, first, changed)
            print(describe_resume(out, first, changed), flush=True)
    else:
        if start == "resume":  # a run stopped before its first checkpoint: its records are redone
            log.warning("--resume: no checkpoint in %s; starting from iteration 0", root)
        elif start == "new":
            refuse_existing_run(out)  # on every process alike
        accelerator.wait_for_everyone()
        if main:
            prepare_new(out)
    if main:
        (out / "config.gin").write_text(gin.operative_config_str() or gin.config_str())
        if launch is not None:
            write_launch(out, launch)
    accelerator.wait_for_everyone()
    return first


def jsonable(value: Any) -> Any:
    """A metric as JSON stores it: a tensor's number, and ``None`` for NaN or Inf."""
    import math

    import torch

    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_row(out: Path, name: str, row: dict[str, Any]) -> None:
    """One JSON row (its values through ``jsonable``) at the end of the jsonl record ``out/name``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / name, "a") as f:
        f.write(json.dumps({k: jsonable(v) for k, v in row.items()}) + "\n")
