"""The base model's evaluation, computed once and shared by every run that would compute it identically.

In a comparison every variant starts from the same base model, and its iteration-0 evaluation (the
held-out rewards and the sample grid) is the same for all of them: same weights, prompts, seeds, grid,
solver, rewards and batching. ``mixgrpo compare`` therefore evaluates the base once, in a cache folder
keyed by a signature of everything that evaluation depends on, and each run copies it instead of
recomputing it. A run whose evaluation would differ in any of those settings gets another signature
and evaluates for itself, so sharing never changes a number.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixgrpo.core import evaluation, records
from mixgrpo.core.interfaces import PromptSet

if TYPE_CHECKING:
    from mixgrpo.core.trainer import Trainer

ROW = "row.json"
GRID = "grid.png"
#: the TrainConfig fields the iteration-0 evaluation and grid depend on
EVAL_FIELDS = ("backbone", "eval_solver", "prompt_set", "rewards", "eval_rewards", "num_steps", "eval_num_steps",
               "shift", "grid", "mu", "shift_terminal", "seed", "eval_every", "eval_prompts", "eval_seeds",
               "sample_every", "sample_prompts", "rollout_batch_size", "eval_diversity", "eval_clip_path",
               "kl_base_copy")


def signature(trainer: Trainer) -> str:
    """A hash of the settings the base evaluation depends on: the fields above and every binding of
    the backbone, prompt set, evaluation solver and reward classes (macros included), unscoped or in
    the evaluation solver's scope ``eval/`` (a ``post/`` binding configures another role's solver),
    except the parameters a ``PromptSet`` class declares ``training_only`` (they change only what
    training draws, e.g. ``ShapesPrompts.pool``)."""
    c, pm = trainer.config, trainer.pm
    prompts = pm.get("prompt_set", c.prompt_set)
    classes = {pm.get("backbone", c.backbone).gin_name, prompts.gin_name, pm.get("sampler", c.eval_solver).gin_name}
    classes |= {pm.get("reward", name).gin_name for name in [*c.rewards, *c.eval_rewards]}
    declares = inspect.isclass(prompts.factory) and issubclass(prompts.factory, PromptSet)
    training_only = {(prompts.gin_name, name) for name in (prompts.factory.training_only if declares else ())}

    def applies(key: str) -> bool:
        scope, _, binding = key.rpartition("/")
        owner, name = binding.rsplit(".", 2)[-2:] if binding.count(".") else ("", binding)
        return key.startswith("%") or (scope in ("", "eval") and owner in classes
                                       and (owner, name) not in training_only)

    bindings = {k: v for k, v in records.snapshot().items() if applies(k)}
    fields = {name: repr(getattr(c, name)) for name in EVAL_FIELDS}
    fields["rewards"] = repr(sorted(c.rewards))  # the weights do not change an evaluation
    blob = json.dumps({"fields": fields, "bindings": bindings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shared(cache: Path) -> Callable[[Trainer, dict[str, Any]], None]:
    """A ``Trainer.base_evaluation`` that shares the base model's evaluation through ``cache``."""
    return lambda trainer, metrics: evaluate_base(trainer, metrics, cache)


def evaluate_base(trainer: Trainer, metrics: dict[str, Any], cache: Path | None) -> None:
    """The iteration-0 evaluation and grid of ``trainer``'s run: copied from ``cache`` when it holds
    this signature's, else computed (and stored there for the next run)."""
    c = trainer.config
    folder = cache / signature(trainer) if cache is not None else None
    evaluate, sample = bool(c.eval_every), bool(c.sample_every)
    if folder is not None and (folder / ROW).is_file():
        stored = json.loads((folder / ROW).read_text())
        metrics.update(stored["metrics"])
        if trainer.accelerator.is_main_process:
            trainer.out.mkdir(parents=True, exist_ok=True)
            if evaluate:
                records.append_row(trainer.out, records.EVAL_SCORES, {"iteration": 0, **stored["scores"]})
            if sample:
                (trainer.out / "samples").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / GRID, trainer.out / "samples" / "iter_000000.png")
        return
    evaluation.base(trainer, metrics)
    if folder is None or not trainer.accelerator.is_main_process:
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    scores = {}
    if evaluate:
        rows = records.read_rows(trainer.out / records.EVAL_SCORES)
        scores = {k: v for k, v in rows[-1].items() if k != "iteration"}
    if sample:
        shutil.copyfile(trainer.out / "samples" / "iter_000000.png", tmp / GRID)
    row = {"metrics": {k: v for k, v in metrics.items() if k != "iteration"}, "scores": scores}
    (tmp / ROW).write_text(json.dumps(row))
    if folder.exists():  # another run stored it meanwhile: both computed the same numbers
        shutil.rmtree(tmp)
    else:
        tmp.rename(folder)
