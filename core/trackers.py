"""Experiment trackers: TensorBoard, Weights & Biases and trackio, through accelerate's tracker API.

``TrainConfig.trackers`` names any combination (``['tensorboard', 'wandb', 'trackio']``); each is an
optional extra of the package (``pip install 'mixgrpo[wandb]'``), and a named tracker that is not
installed is refused before any model loads (``check``). What every tracker receives:

* each ``metrics.jsonl`` row's finite numbers, under the fixed names of ``mixgrpo.core.metrics``, at
  step = the row's iteration (0: the base model's evaluation);
* each sample grid the run draws (``samples/iter_XXXXXX.png``) as the image ``samples/grid`` at its
  iteration;
* the run's config: the operative config (``config.gin``) and every binding (``bindings.json``).

Only the main process logs: ``Accelerator.init_trackers`` starts trackers there alone, so the others
hold none and every call below is a no-op on them.

A resumed run continues the same tracker run. TensorBoard purges its events from the first iteration
the resume runs again; a wandb run is resumed by the id kept in ``trackers.json`` of the run directory
(``resume="allow"``), a trackio run by its name (trackio's own ``resume="allow"``). The steps of wandb
and trackio only go forward, so iterations that a stopped run logged after its last checkpoint keep
their first values there (``metrics.jsonl`` and TensorBoard hold the values of the rerun): those
steps are not logged twice. ``trackers.json`` records, per tracker, the last step it received.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mixgrpo.core.config import TrainConfig

log = logging.getLogger(__name__)

#: tracker name (as accelerate and ``TrainConfig.trackers`` spell it) -> the module it needs, which is
#: also the name of the package extra that installs it
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
#: trackers whose steps only go forward: on resume they skip the steps they already received
FORWARD_ONLY = ("wandb", "trackio")
#: the run directory's record of the tracker run (id, name, project, last step per tracker)
RECORD = "trackers.json"
#: the key sample grids are logged under
GRID_KEY = "samples/grid"


def selected(config: TrainConfig) -> tuple[str, ...]:
    """The trackers a run uses: ``TrainConfig.trackers``, or when it is None TensorBoard if installed
    (the behaviour before trackers could be chosen); the deprecated ``TrainConfig.tensorboard`` adds
    (True) or removes (False) TensorBoard. Unknown names are left out (``check`` refuses them)."""
    return tuple(name for name in requested(config) if name in TRACKERS)


def requested(config: TrainConfig) -> tuple[str, ...]:
    """``selected`` with unknown names kept, in the order given, each once."""
    names = config.trackers
    if names is None:
        names = ("tensorboard",) if importlib.util.find_spec("tensorboard") else ()
    elif isinstance(names, str):
        names = (names,)
    elif not isinstance(names, (list, tuple)):
        return ()  # not a list: check() refuses it
    names = tuple(dict.fromkeys(names))  # repeated names track once
    if config.tensorboard is False:
        names = tuple(n for n in names if n != "tensorboard")
    elif config.tensorboard and "tensorboard" not in names:
        names = (*names, "tensorboard")
    return names


def check(config: TrainConfig) -> None:
    """Refuse an unknown tracker or one whose package is missing, naming the extra to install (before
    any model loads; accelerate would silently drop it); warn on the deprecated ``tensorboard``."""
    names = config.trackers
    if names is not None and not isinstance(names, (str, list, tuple)):
        raise ValueError(f"TrainConfig.trackers = {names!r}: a list of tracker names, e.g. "
                         f"TrainConfig.trackers = ['tensorboard', 'wandb'] (known: {', '.join(TRACKERS)})")
    if config.tensorboard is not None:
        log.warning("TrainConfig.tensorboard is deprecated: use TrainConfig.trackers (e.g. "
                    "TrainConfig.trackers = ['tensorboard'], or [] for none)")
    if not isinstance(config.tracker_project, str) or not config.tracker_project.strip():
        raise ValueError(f"TrainConfig.tracker_project = {config.tracker_project!r}: the wandb and trackio project "
                         "to log to must be a non-empty name, e.g. TrainConfig.tracker_project = 'mixgrpo'")
    for name in requested(config):
        if name not in TRACKERS:
            raise ValueError(f"TrainConfig.trackers names {name!r}, which is not a tracker mixgrpo supports: "
                             f"one of {', '.join(TRACKERS)}")
        module = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"TrainConfig.trackers names {name!r}, but the {module} package is not installed: "
                             f"pip install 'mixgrpo[{module}]' (or drop {name!r} from TrainConfig.trackers)")


def start(accelerator: Accelerator, out: Path, start_iteration: int, config: TrainConfig) -> RunTrackers:
    """Start the run's trackers on the main process (a new tracker run, or on a resume from a
    checkpoint the run's own) and give them the run's config; returns what logs to them."""
    trackers = RunTrackers(accelerator, out)
    if accelerator.is_main_process and accelerator.log_with:
        trackers.begin(start_iteration, config.tracker_project)
    return trackers


class RunTrackers:
    """The trackers of one run as the trainer sees them: ``log(row)`` after each metrics row and
    ``finish()`` at the end. Does nothing on processes other than the main one (they hold no tracker)."""

    def __init__(self, accelerator: Accelerator, out: Path) -> None:
        self.accelerator = accelerator
        self.out = Path(out)
        self.record: dict[str, Any] = {}
        # the grids an earlier process left (a resume): logged only if this run draws them again
        self.old_grids = {p.name: p.stat().st_mtime_ns for p in (self.out / "samples").glob("*.png")}

    def begin(self, start_iteration: int, project: str) -> None:
        """Open the tracker runs: new ones for a run from iteration 0, the recorded ones on resume."""
        acc = self.accelerator
        self.record = resume_record(self.out, project) if start_iteration else new_record(self.out, project)
        acc.trackers = []  # a second train() on the same accelerator starts afresh, not twice
        acc.init_trackers(project, init_kwargs=init_kwargs(self.record, self.out, start_iteration,
                                                            run_config(self.out)))
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":  # its config as text (hparams take scalars only)
                log_config_text(tracker, self.out, start_iteration)
        write_record(self.out, self.record)

    def log(self, row: dict[str, Any]) -> None:
        """The row's finite numbers at step = its iteration, and the grid drawn for that iteration
        (if this process drew one); trackers that already hold the step (a resume) skip it."""
        if not self.accelerator.trackers:
            return
        from mixgrpo.core import records
        from mixgrpo.core.metrics import ITERATION

        step = int(row[ITERATION])
        values = {k: float(records.jsonable(v)) for k, v in row.items()
                  if k != ITERATION and records.jsonable(v) is not None}
        grid = self._new_grid(step)
        for tracker in self.accelerator.trackers:
            if step <= self.record["steps"].get(tracker.name, -1) and tracker.name in FORWARD_ONLY:
                continue
            tracker.log(values, step=step)
            if grid is not None:
                log_image(tracker, grid, step)
            self.record["steps"][tracker.name] = step
        write_record(self.out, self.record)

    def _new_grid(self, step: int) -> Path | None:
        """``samples/iter_<step>.png`` when this process wrote it (not a file left by an earlier one)."""
        from mixgrpo.core.records import iteration_name

        path = self.out / "samples" / f"{iteration_name(step)}.png"
        if not path.is_file() or self.old_grids.get(path.name) == path.stat().st_mtime_ns:
            return None
        return path

    def finish(self) -> None:
        """Flush and close every tracker run (TensorBoard's writer, the wandb and trackio runs)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []


# -- the run's record: one id and name for its tracker runs ------------------------------------------------
def new_record(out: Path, project: str) -> dict[str, Any]:
    """A new tracker run: an id (wandb's run id) and a name unique to it (trackio resumes by name)."""
    run_id = uuid.uuid4().hex[:12]
    return {"id": run_id, "name": f"{out.name}-{run_id}", "project": project, "steps": {}}


def resume_record(out: Path, project: str) -> dict[str, Any]:
    """The recorded tracker run of ``out``, or a new one for a run that has none (started before
    trackers were recorded) or was logged to another project."""
    file = out / RECORD
    if file.is_file():
        record = json.loads(file.read_text())
        if record.get("project") == project:
            record.setdefault("steps", {})
            return record
        log.warning("%s: the run was tracked in project %r; its resume starts a new tracker run in %r",
                    file, record.get("project"), project)
    return new_record(out, project)


def write_record(out: Path, record: dict[str, Any]) -> None:
    tmp = out / f"{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / RECORD)


def init_kwargs(record: dict[str, Any], out: Path, start_iteration: int, config: dict[str, Any]
                ) -> dict[str, dict[str, Any]]:
    """Per tracker, what accelerate passes to its constructor: TensorBoard's purge step on resume;
    wandb's run id, name, folder (``out/wandb``) and config; trackio's run name and config."""
    tensorboard = {"purge_step": start_iteration + 1} if start_iteration else {}
    resume = "allow" if start_iteration else "never"
    return {
        "tensorboard": tensorboard,
        "wandb": {"id": record["id"], "name": record["name"], "dir": str(out), "resume": resume, "config": config},
        "trackio": {"name": record["name"], "resume": resume, "config": config},
    }


def run_config(out: Path) -> dict[str, Any]:
    """The run's config as the run directory records it: the operative config (``config.gin``) and
    every binding (``bindings.json``: ``{"Selector.param": repr(value)}``)."""
    from mixgrpo.core.records import BINDINGS

    gin_file, bindings = out / "config.gin", out / BINDINGS
    return {"operative_config": gin_file.read_text() if gin_file.is_file() else "",
            "bindings": json.loads(bindings.read_text()) if bindings.is_file() else {}}


def log_config_text(tracker: Any, out: Path, step: int) -> None:
    """TensorBoard's Text tab: the operative config and the bindings, as code blocks (Markdown)."""
    config = run_config(out)
    block = "\n".join(f"    {line}" for line in config["operative_config"].splitlines())
    bindings = "\n".join(f"    {k} = {v}" for k, v in sorted(config["bindings"].items()))
    tracker.log({"config/operative_config": block, "config/bindings": bindings}, step=step)


def log_image(tracker: Any, path: Path, step: int) -> None:
    """One sample grid (a PNG) as the image ``samples/grid`` of ``tracker`` at ``step``."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    caption = f"iteration {step}"
    if tracker.name == "tensorboard":  # add_images: a batch of one, height x width x RGB
        tracker.log_images({GRID_KEY: np.asarray(image)[None]}, step=step, dataformats="NHWC")
    elif tracker.name == "wandb":
        import wandb

        tracker.log({GRID_KEY: wandb.Image(image, caption=caption)}, step=step)
    elif tracker.name == "trackio":
        import trackio

        tracker.log({GRID_KEY: trackio.Image(image, caption=caption)}, step=step)

