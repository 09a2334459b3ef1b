"""A run directory's records, kept honest across interruptions and resumes.

* A new run never writes into a directory that already holds one: ``--resume`` continues it,
  ``--overwrite`` deletes its records and checkpoints first.
* ``bindings.json`` keeps every gin binding of the run as it started. A resume compares the new
  config with it: settings that only say how long to run, how often to evaluate or save, where the
  models are, or the optimiser's step sizes may change, and are applied and recorded in
  ``resumes.jsonl``; any other difference changes the experiment, and the resume is refused with
  the list of differing bindings.
* On resume, rows of ``metrics.jsonl`` and ``eval_scores.jsonl`` after the checkpoint's iteration
  (written by iterations the checkpoint does not hold, which will run again) are dropped, and
  TensorBoard is told to purge its events from that step on, so no iteration is ever recorded twice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gin

BINDINGS = "bindings.json"
RESUMES = "resumes.jsonl"
METRICS = "metrics.jsonl"
EVAL_SCORES = "eval_scores.jsonl"
#: what a run directory holds (``--overwrite`` removes exactly these)
RUN_FILES = ("config.gin", BINDINGS, RESUMES, METRICS, EVAL_SCORES, "README.md", "reward_curve.png")
RUN_FOLDERS = ("checkpoints", "samples", "tensorboard", "eval")

#: TrainConfig fields a resume may change: they do not change what an iteration computes (share_prefix:
#: beyond float rounding)
RESUMABLE_FIELDS = ("iterations", "eval_every", "sample_every", "checkpoint_every", "keep_last", "progress",
                    "tensorboard", "learning_rate", "weight_decay", "max_grad_norm", "max_failed_iterations",
                    "output_dir", "ratio_tolerance", "overlap_rewards", "share_prefix")


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
    and where files live (a binding or macro naming a path) or which device a model runs on."""
    name = key.rsplit("/", 1)[-1]
    owner, _, param = name.rpartition(".")
    if owner.rpartition(".")[2] == "TrainConfig" and param in RESUMABLE_FIELDS:
        return True
    lowered = name.lower()
    return any(word in lowered for word in ("path", "checkpoint", "device", "url"))


def diff(old: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


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
        lines = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in refused.items())
        raise RunDirectoryError(
            f"cannot resume {out}: the config differs from the run's in bindings that change the experiment "
            f"({lines}). Resume with the run's own settings (they are in {out / 'config.gin'}), or start a new "
            f"run with another --output. A resume may change only {', '.join(RESUMABLE_FIELDS)} and paths.")
    return changed


def record_resume(out: Path, iteration: int, changed: dict[str, tuple[str | None, str | None]]) -> None:
    """Note the resume and what it changed; the bindings file then describes the run as it goes on."""
    with open(out / RESUMES, "a") as f:
        f.write(json.dumps({"iteration": iteration, "changed": {k: list(v) for k, v in changed.items()}}) + "\n")
    if changed:
        (out / BINDINGS).write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")


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
