"""Open a run's model and export it for diffusers.

A run directory holds ``config.gin`` (the operative config) and ``checkpoints/iter_XXXXXX/``.
``open_model`` rebuilds the run's backbone from its config and loads one checkpoint into it through
``load_checkpoint_weights``, the one place that knows how a checkpoint stores the weights.
``export_run`` then has the backbone write what its diffusers pipeline loads (``Backbone.export``:
the backbone, not the core, knows the pipeline and its formats; a LoRA run gives an adapter that the
pipeline's ``load_lora_weights`` loads, a full fine-tune a transformer folder that replaces the base
model's) and records what was written in ``mixgrpo_export.json``. A backbone whose
``model_facts().pipeline`` is None has nothing to export.

Every output folder is written beside its destination first and moved into place, so a failed
export leaves nothing half-written; its files get the mode a plain ``open()`` gives (``0o666 & ~umask``,
where safetensors alone would write 0600), and an existing non-empty folder is only written into with
``force``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from mixgrpo.core import checkpoint as ckpt
from mixgrpo.core.config import TrainConfig, load_config
from mixgrpo.core.interfaces import Backbone
from mixgrpo.core.plugins import PluginManager

RUN_CONFIG = "config.gin"
CHECKPOINTS = "checkpoints"
#: what was exported, from where, and how to load it
EXPORT_INFO = "mixgrpo_export.json"
BASE = "base"  # the checkpoint name that means "no checkpoint: the base model"


class ExportError(ValueError):
    """Bad input to ``export`` or ``sample``: the message is one line saying what to do."""


@attrs.define
class OpenedModel:
    """A run's (or a config's) backbone with a checkpoint loaded into it.

    Attributes:
        config: the ``TrainConfig`` the backbone was built from.
        pm: the plugin manager that built it.
        backbone: the backbone, weights loaded, in eval mode.
        run_dir: the run directory, or None when opened from a gin file.
        checkpoint: the checkpoint folder loaded, or None for the base model.
        iteration: the checkpoint's iteration (0 for the base model).
    """

    config: TrainConfig
    pm: PluginManager
    backbone: Backbone
    run_dir: Path | None
    checkpoint: Path | None
    iteration: int


# -- checkpoints -----------------------------------------------------------------------------------
def load_checkpoint_weights(backbone: Backbone, checkpoint: str | os.PathLike) -> None:
    """Load the trained weights of ``checkpoint`` (a ``checkpoints/iter_XXXXXX`` folder) into
    ``backbone.module``, through the checkpoint module (optimizer state is not read). A run that
    kept an EMA of its weights is represented by the average, the weights it evaluated and reported.

    A checkpoint whose weights do not fit the backbone (another backbone family, LoRA against full
    fine-tuning, another size) raises ``ExportError``.
    """
    path = Path(checkpoint)
    if not (path / ckpt.STATE_FILE).is_file():
        raise ExportError(f"{path} is not a mixgrpo checkpoint folder (no {ckpt.STATE_FILE})")
    module = backbone.module
    try:
        ckpt.read_state(path)
    except ValueError as exc:  # an older checkpoint format
        raise ExportError(str(exc)) from None
    try:
        ckpt.load_module_weights(module, path, prefer_ema=True)
    except ValueError as exc:
        raise ExportError(f"{exc} (it does not fit the {type(backbone).__name__} of this config)") from None
    except RuntimeError as exc:  # shapes that do not match
        raise ExportError(f"checkpoint {path} does not fit the {type(backbone).__name__} of this config (its "
                          f"weights have other shapes: {str(exc).splitlines()[0]}): was it written by another "
                          f"backbone family, or with another lora_rank?") from None
    module.eval()


def checkpoint_backbone(checkpoint: Path) -> str | None:
    """The backbone name (``TrainConfig.backbone``) of the run a checkpoint folder lies in, if known."""
    config = checkpoint.parent.parent / RUN_CONFIG
    if not config.is_file():
        return None
    found = re.search(r"^TrainConfig\.backbone\s*=\s*['\"]([^'\"]+)['\"]", config.read_text(), re.MULTILINE)
    return found.group(1) if found else None


def resolve_checkpoint(spec: str | None, checkpoints: Path, allow_base: bool = True) -> Path | None:
    """The checkpoint folder ``spec`` names, relative to a run's ``checkpoints`` folder.

    ``spec``: None or ``latest`` (the latest checkpoint), ``base`` (None: the base model, when
    ``allow_base``), an iteration number (``40``), a checkpoint name (``iter_000040``) or a path to a
    checkpoint folder. Anything that names no checkpoint is an ``ExportError``.
    """
    if spec == BASE:
        if not allow_base:
            raise ExportError("--checkpoint base names the base model, which has nothing to export")
        return None
    if spec is None or spec == "latest":
        found = ckpt.latest(checkpoints)
        if found is None:
            hint = ", or pass --checkpoint base for the base model" if allow_base else ""
            raise ExportError(f"{checkpoints.parent} has no checkpoint ({checkpoints / 'latest'} not found): a run "
                              f"writes one after its last iteration and every TrainConfig.checkpoint_every "
                              f"iterations, so this one stopped before writing any; continue it with "
                              f"`mixgrpo train {checkpoints.parent} --resume`{hint}")
        return found
    candidates = [Path(spec)]
    if spec.isdigit():
        candidates.insert(0, checkpoints / f"iter_{int(spec):06d}")
    elif "/" not in spec and os.sep not in spec:
        candidates.insert(0, checkpoints / spec)
    for path in candidates:
        if (path / ckpt.STATE_FILE).is_file():
            return path
    raise ExportError(f"checkpoint {spec!r} not found (looked for {', '.join(str(p) for p in candidates)}; "
                      f"a checkpoint folder holds {ckpt.STATE_FILE})")


def open_model(source: str | os.PathLike, checkpoint: str | None = None, bindings: Sequence[str] = (),
               require_checkpoint: bool = False) -> OpenedModel:
    """Build the backbone of a run directory (or of a gin file) and load a checkpoint into it.

    Args:
        source: a run directory (holding ``config.gin``) or an experiment ``.gin`` file.
        checkpoint: see ``resolve_checkpoint``. For a run directory the default is its latest
            checkpoint (an error if it has none); for a gin file it is the base model, and names
            are looked up in the config's ``output_dir/checkpoints``.
        bindings: extra gin bindings, applied after the config.
        require_checkpoint: the base model is not acceptable (``export``).
    """
    src = Path(source)
    if src.is_dir():
        config_file = src / RUN_CONFIG
        if not config_file.is_file():
            raise ExportError(f"{src} is not a run directory: it has no {RUN_CONFIG}")
        run_dir: Path | None = src
        bindings = [*bindings, f"TrainConfig.output_dir = {str(src)!r}"]
    elif src.is_file():
        config_file, run_dir = src, None
    else:
        raise ExportError(f"{src} is neither a run directory nor a gin file")
    config, pm = load_config(config_file, bindings)
    checkpoints = Path(config.output_dir) / CHECKPOINTS
    if run_dir is None and checkpoint is None and not require_checkpoint:
        path = None  # a gin file alone: its base model
    else:
        path = resolve_checkpoint(checkpoint, checkpoints, allow_base=not require_checkpoint)
    if path is not None:
        family = checkpoint_backbone(path)
        if family is not None and family != config.backbone:
            raise ExportError(f"checkpoint {path} was written by a {family!r} run, but {src} is a "
                              f"{config.backbone!r} run: a checkpoint loads only into its own backbone family")
    backbone = pm.create("backbone", config.backbone)
    iteration = 0
    if path is not None:
        load_checkpoint_weights(backbone, path)
        iteration = int(json.loads((path / ckpt.STATE_FILE).read_text()).get("iteration", 0))
    backbone.module.eval()
    return OpenedModel(config=config, pm=pm, backbone=backbone, run_dir=run_dir, checkpoint=path,
                       iteration=iteration)


# -- output folders --------------------------------------------------------------------------------
def check_output_dir(out: Path, force: bool, flag: str = "--force") -> None:
    """An error unless ``out`` is missing, empty, or ``force`` allows writing into it."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; choose another folder or pass {flag} to write into it")


def staging_dir(out: Path) -> Path:
    """An empty folder beside ``out`` to write into before ``publish``."""
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> Path:
    """Move everything written in ``tmp`` into ``out`` (replacing files of the same name), then
    remove ``tmp``."""
    if not out.exists():
        os.replace(tmp, out)
        return out
    for entry in tmp.iterdir():
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
    return out


# -- export ----------------------------------------------------------------------------------------
def export_run(run_dir: str | os.PathLike, to: str | os.PathLike, checkpoint: str | None = None,
               force: bool = False, max_shard_size: str | int = "5GB", bindings: Sequence[str] = ()) -> dict:
    """Export a checkpoint of a run for diffusers into the folder ``to``; returns what was written
    (also saved as ``to/mixgrpo_export.json``): ``Backbone.export``'s description (``kind``,
    ``pipeline``, ``load``, ...) with the run, checkpoint and base model it came from."""
    src, out = Path(run_dir), Path(to)
    if not src.is_dir():
        raise ExportError(f"{src} is not a run directory (export takes a run directory, not a gin file)")
    check_output_dir(out, force)
    opened = open_model(src, checkpoint, bindings, require_checkpoint=True)
    backbone = opened.backbone
    facts = backbone.model_facts()
    if not facts.pipeline:
        raise ExportError(f"export writes models for a diffusers pipeline; backbone {type(backbone).__name__} "
                          "does not name one (its model_facts().pipeline)")
    tmp = staging_dir(out)
    try:
        written = backbone.export(tmp, max_shard_size=max_shard_size, load_path=str(out))
        info: dict[str, Any] = {"kind": written.pop("kind"), "backbone": opened.config.backbone,
                                "base_model": facts.base_model or "", "run": str(opened.run_dir),
                                "checkpoint": str(opened.checkpoint), "iteration": opened.iteration, **written}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        ckpt.share_like_open(tmp)  # diffusers' savers write safetensors 0600; a shared folder needs umask's
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
