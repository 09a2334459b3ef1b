"""Scoring rewards and training on stored trajectories (the inner parts of ``Trainer.iteration``)."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mixgrpo.core.advantages import zero_std_fraction
from mixgrpo.core.interfaces import Reward
from mixgrpo.core.rollout import keyed_generator
from mixgrpo.core.types import Trajectories

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mixgrpo.core.trainer import Trainer

log = logging.getLogger(__name__)


class RewardFailure(RuntimeError):
    """A reward returned something that is not one finite score per image, or failed every sample."""


def _as_scores(raw: Any, name: str, count: int) -> torch.Tensor:
    scores = torch.as_tensor(raw)
    if not (scores.is_floating_point() or scores.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                            torch.uint8)):
        raise RewardFailure(f"reward {name!r} returned scores of dtype {scores.dtype}; expected real numbers")
    scores = scores.detach().float().reshape(-1).cpu()
    if scores.numel() != count:
        raise RewardFailure(f"reward {name!r} returned {scores.numel()} scores for {count} images")
    return scores


def call_reward(reward: Reward, name: str, images: torch.Tensor, prompts: Sequence[str],
                errors: dict[str, BaseException] | None = None) -> torch.Tensor:
    """Scores ``[N]`` float32. Whatever goes wrong is masked as NaN (left out of the group statistics,
    advantage 0), loudly, and never scored as a plausible value: an exception, scores of the wrong
    number or dtype (every sample), NaN or ±Inf (those samples). ``errors`` receives the exception of
    a call that scored no sample."""
    try:
        scores = _as_scores(reward(images, list(prompts)), name, len(prompts))
    except Exception as exc:  # one failed reward call must neither kill the run nor score 0
        warnings.warn(f"reward {name!r} failed on {len(prompts)} samples ({type(exc).__name__}: {exc}); "
                      f"they are masked out of the group statistics", RuntimeWarning, stacklevel=2)
        if errors is not None:
            errors[name] = exc
        return torch.full((len(prompts),), float("nan"))
    bad = ~torch.isfinite(scores)
    if bad.any():
        warnings.warn(f"reward {name!r} gave {int(bad.sum())} non-finite score(s) of {len(prompts)}; they are "
                      f"masked out of the group statistics", RuntimeWarning, stacklevel=2)
        scores[bad] = float("nan")
        if bad.all() and errors is not None:
            errors[name] = RewardFailure(f"reward {name!r} scored every sample NaN or Inf")
    return scores


def score_rewards(rewards: Mapping[str, Reward], images: torch.Tensor, prompts: Sequence[str],
                  group_ids: torch.Tensor, accelerator: Accelerator,
                  errors: dict[str, BaseException] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Score local samples with every trained reward; metrics are over all processes
    (``reward/<name>/failed`` counts the masked samples)."""
    scores: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    all_groups = accelerator.gather(group_ids.to(accelerator.device)).cpu()
    for name, reward in rewards.items():
        s = call_reward(reward, name, images, prompts, errors)
        scores[name] = s
        everywhere = accelerator.gather(s.to(accelerator.device)).cpu()
        ok = everywhere[~everywhere.isnan()]
        metrics[f"reward/{name}/mean"] = ok.mean().item() if ok.numel() else float("nan")
        metrics[f"reward/{name}/std"] = ok.std(unbiased=False).item() if ok.numel() else float("nan")
        metrics[f"reward/{name}/failed"] = float(everywhere.isnan().sum())
        metrics[f"reward/{name}/zero_std_groups"] = zero_std_fraction(everywhere, all_groups)
    return scores, metrics


def evaluate_rewards(rewards: Mapping[str, Reward], images: torch.Tensor, prompts: Sequence[str],
                     scores: dict[str, list[float]] | None = None) -> dict[str, float]:
    """``eval/<name>/mean`` and ``eval/<name>/sem`` (standard error over the evaluated images).

    ``scores``, when given, receives each reward's per-image scores (NaN for a failed image), in
    the order of ``images``: the same prompts and seeds at every evaluation make them pairable.
    """
    out: dict[str, float] = {}
    for name, reward in rewards.items():
        s = call_reward(reward, name, images, prompts)
        if scores is not None:
            scores[name] = [float(v) for v in s.float().cpu()]
        ok = s[~s.isnan()]
        n = ok.numel()
        out[f"eval/{name}/mean"] = ok.mean().item() if n else float("nan")
        out[f"eval/{name}/sem"] = (ok.std().item() / math.sqrt(n)) if n > 1 else float("nan")
    return out


def _micro_batches(traj: Trajectories, rows: torch.Tensor, mask: torch.Tensor,
                   size: int) -> list[tuple[int, torch.Tensor]]:
    """``(step, sample rows)`` pairs: for each trained step, its samples in chunks of ``size``."""
    chunks = []
    for step in traj.plan.all_train_steps():
        members = rows[mask[rows, step]]
        chunks += [(step, part) for part in members.split(size)]
    return chunks


def recompute_log_prob(trainer: Trainer, traj: Trajectories, step: int, rows: torch.Tensor) -> tuple[Any, Any]:
    """Log-probs of the stored transitions at ``step`` under the current weights (with grad),
    and the KL to the frozen reference when the objective uses one."""
    device = trainer.backbone.device
    slot = traj.slot(step)
    x = traj.x[rows, slot].to(device)
    x_next = traj.x_next[rows, slot].to(device)
    cond = traj.cond.select(rows).to(device)
    sigma = torch.full((len(rows),), float(traj.sigmas[step]), device=device)
    v = trainer.backbone.velocity(x, sigma, cond)
    res = trainer.sde_sampler.step(x, v, traj.sigmas, step, prev_sample=x_next)
    kl = None
    if trainer.objective.uses_reference:
        with torch.no_grad(), trainer.backbone.reference():
            v_ref = trainer.backbone.velocity(x, sigma, cond)
        ref = trainer.sde_sampler.step(x, v_ref, traj.sigmas, step, prev_sample=x_next)
        kl = trainer.objective.kl(res, ref, traj.sigmas, step)
    return res.log_prob, kl


def train_on_trajectories(trainer: Trainer, traj: Trajectories, advantages: torch.Tensor,
                          iteration: int) -> dict[str, float]:
    """Optimizer steps over the iteration's samples; returns the policy metrics.

    The samples are split into ``num_minibatches`` minibatches (one optimizer step each). Each step
    averages the loss over its (sample, trained step) pairs. The first minibatch runs before any
    update, so its ratios must be 1: that is the on-policy check (``policy/onpolicy_ratio_dev``).
    A minibatch whose loss or gradient norm is not finite takes no optimizer step (its gradient
    never reaches the weights or the optimizer state) and is counted in ``policy/skipped_steps``.
    """
    c, acc, objective = trainer.config, trainer.accelerator, trainer.objective
    n = len(traj)
    mask = traj.plan.train_mask(n)
    order = torch.randperm(n, generator=keyed_generator(c.seed, iteration, "minibatches"))
    sums: dict[str, float] = defaultdict(float)
    items, first_dev, grad_norms, skipped = 0, 0.0, [], 0
    params = trainer.backbone.trainable_parameters()
    for mb_index, mb in enumerate(order.chunk(c.num_minibatches)):
        chunks = _micro_batches(traj, mb.sort().values, mask, c.micro_batch_size)
        total = sum(len(rows) for _, rows in chunks)
        if total == 0:
            continue
        trainer.optimizer.zero_grad(set_to_none=True)
        loss_finite = True
        for j, (step, rows) in enumerate(chunks):
            last = j == len(chunks) - 1
            with contextlib.nullcontext() if last else trainer.no_sync():
                log_prob, kl = recompute_log_prob(trainer, traj, step, rows)
                old = traj.log_prob[rows, traj.slot(step)].to(log_prob.device)
                terms, stats = objective.loss(log_prob, old, advantages[rows].to(log_prob.device), kl)
                loss = terms.sum() / total
                loss_finite &= bool(torch.isfinite(loss.detach()))
                acc.backward(loss)
            for key, value in stats.items():
                sums[key] += float(value.detach().float().sum())
            items += len(rows)
            if mb_index == 0:
                first_dev = max(first_dev, float((stats["ratio"] - 1).abs().max()))
        grad_norm = trainer.clip_grad_norm(params, c.max_grad_norm)
        if not (math.isfinite(grad_norm) and trainer.all_processes(loss_finite)):
            trainer.optimizer.zero_grad(set_to_none=True)
            skipped += 1
            log.warning("iteration %d, minibatch %d: non-finite %s; the optimizer step is skipped",
                        iteration, mb_index, "loss" if not loss_finite else f"gradient norm ({grad_norm})")
            continue
        grad_norms.append(grad_norm)
        trainer.optimizer.step()
        trainer.after_optimizer_step()
    tolerance = trainer.ratio_tolerance
    if first_dev > tolerance:
        log.warning("on-policy ratio deviates from 1 by %.2e before the first update (tolerance %.0e, a tenth "
                    "of the clip range by default): rollout and training compute different log-probs",
                    first_dev, tolerance)
    calls = trainer.backbone.calls_per_velocity * (2 if objective.uses_reference else 1)
    mean = {k: v / max(items, 1) for k, v in sums.items()}
    return {
        "policy/ratio_mean": mean.get("ratio", float("nan")),
        "policy/clipfrac": mean.get("clipped", float("nan")),
        "policy/approx_kl": mean.get("approx_kl", float("nan")),
        "policy/onpolicy_ratio_dev": first_dev,
        "policy/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        "policy/skipped_steps": float(skipped),
        "loss/policy": mean.get("policy", float("nan")),
        "loss/kl": mean.get("kl", 0.0),
        "perf/nfe_train": calls * items / max(n, 1),
    }
