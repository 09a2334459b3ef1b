"""Atomic checkpoints and resume, the same for one process, DDP and FSDP.

A checkpoint is ``checkpoints/iter_XXXXXX/``:

* ``model.safetensors``: the trainable parameters (all weights of a full fine-tune, the adapters of
  a LoRA run), whole (gathered from the shards of an FSDP run), fp32, by their names in the unwrapped
  network;
* ``optimizer.safetensors`` + ``optimizer.json``: the AdamW state of those parameters (whole, by
  parameter name) and the optimizer's parameter groups;
* ``ema.safetensors`` when the run keeps a moving average of the weights;
* ``trainer_state.json``: format version, iteration, seed, objective, EMA step count.

Nothing is pickled, and a checkpoint of an FSDP run loads into a one-process run and the other way
round (the layout does not depend on how the run was spread). It is written to a temporary folder
and renamed into place, then ``checkpoints/latest`` is replaced atomically, so a crash mid-write
never leaves a half checkpoint that resume would pick up; before the rename its files get the mode a
plain ``open()`` gives (``0o666 & ~umask``). Windows, prompts and noise are pure functions of (seed,
iteration), so the iteration number is all the extra state resume needs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mixgrpo.core.parallel import full_tensor, is_sharded
from mixgrpo.core.records import ITERATION_GLOB, iteration_name

if TYPE_CHECKING:
    from mixgrpo.core.trainer import Trainer

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_GROUPS = "optimizer.json"
EMA_FILE = "ema.safetensors"
FORMAT = 2
_SEP = "::"  # optimizer tensors are stored as "<parameter name>::<state key>"


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _torch_optimizer(trainer: Trainer) -> torch.optim.Optimizer:
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)  # accelerate's wrapper holds the torch optimizer


def trainable_names(trainer: Trainer) -> list[str]:
    """Names of the trainable parameters in the unwrapped network, in optimizer order."""
    return [name for name, p in trainer.backbone.unwrapped().named_parameters() if p.requires_grad]


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere: set it and put it back
    os.umask(mask)
    return mask


def share_like_open(root: Path) -> None:
    """Give ``root`` (a file) or every file under it (a folder) the mode a plain ``open()`` gives a new
    file, ``0o666 & ~umask`` (0644 under umask 022): safetensors (and so diffusers' and peft's savers)
    writes its files 0600, which a team sharing a model folder cannot read. Called on a folder before
    it is renamed into place, so the published files never have another mode."""
    mode = 0o666 & ~umask()
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in files:
        os.chmod(path, mode)


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, with an I/O failure raised as the ``OSError`` it is (safetensors
    reports a full disk as its own error type)."""
    import re

    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except Exception as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc


def save(trainer: Trainer, root: Path, iteration: int, keep_last: int = 0) -> Path:
    """Write checkpoint ``iter_<iteration>`` under ``root`` (every process must call it); with
    ``keep_last`` > 0, delete all but the newest ``keep_last`` checkpoints afterwards (never the one
    ``latest`` points to)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    acc = trainer.accelerator
    final = root / iteration_name(iteration)
    tmp = root / f".tmp_{iteration_name(iteration)}"
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    # collectives under FSDP: every process takes part, the main process receives the whole tensors
    model = trainer.backbone.unwrapped()
    options = _options(cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, _torch_optimizer(trainer), options=options)
    names = trainable_names(trainer)
    ema = None
    if trainer.ema is not None:
        ema = {n: full_tensor(t).cpu() for n, t in zip(names, trainer.ema.shadow, strict=True)}
    if acc.is_main_process:
        trainable = set(names)  # buffers (e.g. SD3's fixed position table) are not state
        _write_tensors({k: v.contiguous() for k, v in weights.items() if k in trainable}, tmp / MODEL_FILE)
        tensors = {f"{name}{_SEP}{key}": torch.as_tensor(value).contiguous()
                   for name, state in optim["state"].items() for key, value in state.items()}
        _write_tensors(tensors, tmp / OPTIMIZER_FILE)
        (tmp / OPTIMIZER_GROUPS).write_text(json.dumps({"param_groups": optim["param_groups"]}, indent=1))
        if ema is not None:
            _write_tensors({k: v.contiguous() for k, v in ema.items()}, tmp / EMA_FILE)
        if trainer.replay is not None:  # an off-policy objective's buffer (core/replay.py)
            trainer.replay.save(tmp)
        c = trainer.config
        state = {"format": FORMAT, "iteration": iteration, "seed": c.seed, "objective": c.objective,
                 "ema_steps": trainer.ema.num_steps if trainer.ema is not None else None}
        (tmp / STATE_FILE).write_text(json.dumps(state))
        share_like_open(tmp)  # safetensors writes 0600
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        if keep_last > 0:
            prune(root, keep_last)
    acc.wait_for_everyone()
    return final


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (and stale temporary folders
    of interrupted writes); the one ``latest`` points to is always kept. Returns the deleted ones."""
    current = latest(root)
    done = sorted(p for p in root.glob(ITERATION_GLOB) if (p / STATE_FILE).is_file())
    deleted = [p for p in done[:-keep_last] if p != current]
    deleted += list(root.glob(".tmp_iter_*"))  # a write that never completed (save renames its own)
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def read_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of checkpoint ``path``; a clear error for a folder that is not a
    checkpoint of this format."""
    file = path / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a mixgrpo checkpoint (no {STATE_FILE})")
    state = json.loads(file.read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {state.get('format', 1)}, this mixgrpo reads format "
                         f"{FORMAT} (weights, optimizer and EMA as safetensors); it was written by an older "
                         f"version: resume it with that version, or start a new run")
    return state


def load_module_weights(module: torch.nn.Module, path: Path, prefer_ema: bool = False) -> str:
    """Load the trainable weights of checkpoint ``path`` into ``module`` (the unwrapped network, or
    this process's shards of it); with ``prefer_ema`` the moving average when the checkpoint has
    one (the weights a run with an EMA reports). Returns the file read. Every process must call it.
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    read_state(path)
    file = EMA_FILE if prefer_ema and (path / EMA_FILE).is_file() else MODEL_FILE
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    weights = load_file(str(path / file))
    _check_names(path, names, weights)
    set_model_state_dict(module, weights, options=_options(strict=False))
    return file


def _check_names(path: Path, names: list[str], weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} holds the weights of another model or fine-tuning mode "
                         f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'…' if len(unexpected) > 3 else ''}): check the backbone and lora_rank")


def load_weights(trainer: Trainer, path: Path) -> dict[str, Any]:
    """Load the trainable weights of checkpoint ``path`` into the trainer's network (and its EMA);
    returns the checkpoint's state. Every process must call it."""
    from safetensors.torch import load_file

    state = read_state(path)
    load_module_weights(trainer.backbone.unwrapped(), path)
    if trainer.ema is not None:
        file = path / EMA_FILE
        if not file.is_file():
            raise ValueError(f"checkpoint {path} has no {EMA_FILE}: it comes from a run without an EMA "
                             f"(TrainConfig.ema_decay); resume with the same config")
        averages = load_file(str(file))
        names = trainable_names(trainer)
        _check_names(path, names, averages)
        for name, avg in zip(names, trainer.ema.shadow, strict=True):
            _copy_full_into(avg, averages[name])
        trainer.ema.num_steps = int(state["ema_steps"])
    return state


def resume(trainer: Trainer, root: Path) -> int:
    """Load the latest checkpoint under ``root`` (weights, optimizer, EMA); returns the iteration to
    continue from (0 if there is none)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = latest(root)
    if path is None:
        return 0
    state = read_state(path)
    if state.get("seed") != trainer.config.seed:
        raise ValueError(f"checkpoint {path} was written with seed {state.get('seed')} but the config has seed "
                         f"{trainer.config.seed}; resume with the same config or use a new output_dir")
    load_weights(trainer, path)
    tensors = load_file(str(path / OPTIMIZER_FILE))
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.split(_SEP)
        per_param.setdefault(name, {})[field] = value
    groups = json.loads((path / OPTIMIZER_GROUPS).read_text())["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    set_optimizer_state_dict(trainer.backbone.unwrapped(), _torch_optimizer(trainer),
                             {"state": per_param, "param_groups": groups}, options=_options())
    if trainer.replay is not None:
        trainer.replay.load(path)
    return int(state["iteration"])


def _copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into ``dst``, which may be this process's shard of a sharded tensor."""
    if is_sharded(dst):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(dst.device_mesh.device_type), dst.device_mesh, dst.placements)
    dst.copy_(full.to(dst.dtype))
