"""Held-out evaluation and sample grids of a training run: the model as it is (its EMA when the run
keeps one) sampled with the ODE on fixed prompts and seeds, the same every time, so numbers and
images pair up across iterations and runs."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from mixgrpo.core import hacking, records, scoring
from mixgrpo.core import metrics as m
from mixgrpo.core.grids import save_sample_grid, scored_captions
from mixgrpo.core.rollout import sample_ode

if TYPE_CHECKING:
    from mixgrpo.core.trainer import Trainer

log = logging.getLogger(__name__)
_told: set[str] = set()  # the runs already told that eval/kl_base is not available (said once per run)


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
    """Held-out rewards with deterministic ODE sampling: ``eval/<name>/mean`` and ``/sem``, then the
    within-prompt diversity ``eval/diversity/{mean,sem}`` and, where the base model is at hand, the
    drift from it ``eval/kl_base/mean`` (``mixgrpo.core.hacking``).

    The same prompts and seeds every time; ``scores`` (optional) receives the per-image scores."""
    c = trainer.config
    prompts = trainer.prompt_set("eval", c.eval_prompts, c.seed + 1)
    seeds = [c.seed + 1000 * s for s in range(c.eval_seeds)]
    all_prompts = [p for _ in seeds for p in prompts]
    all_seeds = [s for s in seeds for _ in prompts]
    show = c.progress and trainer.accelerator.is_main_process
    drift = drift_probe(trainer)
    images = sample_ode(drift or trainer.backbone, all_prompts, all_seeds, setup=trainer.eval_setup,
                        solver=trainer.eval_solver, batch_size=c.rollout_batch_size,
                        progress=f"held-out evaluation, {len(all_prompts)} images" if show else None)
    out = scoring.evaluate({**trainer.rewards, **trainer.eval_only_rewards}, images, all_prompts, scores)
    out.update(hacking.diversity_metrics(images, len(seeds), c.eval_diversity, c.eval_clip_path))
    if drift is not None:
        out[m.KL_BASE_MEAN] = drift.mean()
    return out


def freeze_base(trainer: Trainer) -> None:
    """Keep the base weights for ``Backbone.reference()`` when the objective's KL term or
    ``TrainConfig.kl_base_copy`` asks for them (the trainer calls it before any resume or update)."""
    if trainer.objective.uses_reference or trainer.config.kl_base_copy:
        trainer.backbone.freeze_reference()


def drift_probe(trainer: Trainer) -> hacking.VelocityDrift | None:
    """The backbone that measures ``eval/kl_base`` on the evaluation's trajectories, or None (said once
    per run) when the base model is not at hand: a full fine-tune whose objective keeps no copy."""
    backbone, c = trainer.backbone, trainer.config
    if not hacking.base_available(trainer.objective.uses_reference, backbone.lora_rank, c.kl_base_copy):
        if str(trainer.out) not in _told:
            _told.add(str(trainer.out))
            log.info("eval/kl_base is not reported: full fine-tuning keeps no copy of the base weights "
                     "(TrainConfig.kl_base_copy = True keeps one)")
        return None
    sigmas = trainer.eval_setup.sigmas(None)
    return hacking.VelocityDrift(backbone, [float(sigmas[i]) for i in hacking.probed_steps(sigmas.numel() - 1)])


def hacking_stop(trainer: Trainer, row: dict[str, Any]) -> list[str]:
    """After an evaluation (``row`` holds one): warn of every hacking signal of the run so far
    (``hacking.hacking_signals`` on ``metrics.jsonl``, read by the main process), and return the
    reason to stop, ``[why]``, when ``TrainConfig.stop_on_hacking`` is set; else ``[]``."""
    if not trainer.accelerator.is_main_process or not any(key.startswith("eval/") for key in row):
        return []
    rewards = {**trainer.rewards, **trainer.eval_only_rewards}
    lower = {name for name, reward in rewards.items() if not scoring.higher_is_better(reward)}
    signals = hacking.hacking_signals(records.read_rows(trainer.out / records.METRICS), trainer.rewards,
                                      trainer.eval_only_rewards, lower_is_better=lower)
    for signal in signals:
        log.warning("possible reward hacking at iteration %s: %s", row[m.ITERATION], signal)
    if signals and trainer.config.stop_on_hacking:
        return [f"possible reward hacking (TrainConfig.stop_on_hacking): {signals[0]}"]
    return []


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
