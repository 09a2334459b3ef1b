"""Held-out evaluation and sample grids of a training run: the model as it is (its EMA when the run
keeps one) sampled with the ODE on fixed prompts and seeds, the same every time, so numbers and
images pair up across iterations and runs."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from mixgrpo.core import metrics as m
from mixgrpo.core import records, scoring
from mixgrpo.core.grids import save_sample_grid, scored_captions
from mixgrpo.core.rollout import sample_ode

if TYPE_CHECKING:
    from mixgrpo.core.trainer import Trainer


def base(trainer: Trainer, row: dict[str, Any]) -> None:
    """The base model's evaluation into ``row`` and its grid (iteration 0), when the run evaluates
    or draws grids at all (``Trainer.base_evaluation`` may replace it, e.g. by a shared cache)."""
    if trainer.config.eval_every:
        record(trainer, 0, row)
    if trainer.config.sample_every:
        draw_grid(trainer, 0)


def when_due(trainer: Trainer, iteration: int, row: dict[str, Any], last: bool) -> None:
    """Held-out evaluation into ``row`` and the sample grid, when due (always after the last)."""
    c = trainer.config
    if c.eval_every and (iteration % c.eval_every == 0 or last):
        record(trainer, iteration, row)
    if c.sample_every and (iteration % c.sample_every == 0 or last):
        draw_grid(trainer, iteration)


def record(trainer: Trainer, iteration: int, metrics: dict[str, Any]) -> None:
    """Held-out rewards of the model as it is at ``iteration`` (its EMA when the run keeps one)
    into ``metrics``, and every image's score into ``eval_scores.jsonl``."""
    trainer.backbone.module.eval()
    scores: dict[str, list[float]] = {}
    with weights(trainer):
        metrics.update(evaluate(trainer, scores))
    if trainer.accelerator.is_main_process:
        records.append_row(trainer.out, records.EVAL_SCORES, {m.ITERATION: iteration, **scores})


def evaluate(trainer: Trainer, scores: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Held-out rewards with deterministic ODE sampling: ``eval/<name>/mean`` and ``/sem``.

    The same prompts and seeds every time; ``scores`` (optional) receives the per-image scores."""
    c = trainer.config
    prompts = trainer.prompt_set("eval", c.eval_prompts, c.seed + 1)
    seeds = [c.seed + 1000 * s for s in range(c.eval_seeds)]
    all_prompts = [p for _ in seeds for p in prompts]
    all_seeds = [s for s in seeds for _ in prompts]
    show = c.progress and trainer.accelerator.is_main_process
    images = sample_ode(trainer.backbone, all_prompts, all_seeds, setup=trainer.eval_setup,
                        solver=trainer.eval_solver, batch_size=c.rollout_batch_size,
                        progress=f"held-out evaluation, {len(all_prompts)} images" if show else None)
    return scoring.evaluate({**trainer.rewards, **trainer.eval_only_rewards}, images, all_prompts, scores)


def draw_grid(trainer: Trainer, iteration: int) -> None:
    """The sample grid at fixed prompts and seeds, each image with its scores (written by the main
    process; under FSDP every process takes part in the forward passes, which gather shards)."""
    main = trainer.accelerator.is_main_process
    if not main and not trainer.parallel.sharded:
        return
    c = trainer.config
    trainer.backbone.module.eval()
    prompts = trainer.prompt_set("eval", c.sample_prompts, c.seed)
    with weights(trainer):
        images = sample_ode(trainer.backbone, prompts, [c.seed] * len(prompts), setup=trainer.eval_setup,
                            solver=trainer.eval_solver, batch_size=c.rollout_batch_size)
    if not main:
        return
    captions = scored_captions({**trainer.rewards, **trainer.eval_only_rewards}, images, prompts)
    save_sample_grid(images, captions, trainer.out / "samples" / f"{records.iteration_name(iteration)}.png",
                     title=f"iteration {iteration}" + (" (base model)" if iteration == 0 else ""))


def weights(trainer: Trainer) -> contextlib.AbstractContextManager:
    """The weights held-out numbers are reported for: the EMA when the run keeps one."""
    if trainer.ema is None:
        return contextlib.nullcontext()
    return trainer.ema.applied(trainer.backbone.trainable_parameters())
