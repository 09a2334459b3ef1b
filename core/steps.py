"""Step 5's bookkeeping, shared by both kinds of objective: minibatches of micro-batches → optimizer
steps, and the ``policy/*`` metrics they add up to.

A minibatch is one optimizer step. Its micro-batches each compute their loss terms; the terms'
sum over all of them, divided by the minibatch's number of terms, is back-propagated micro-batch by
micro-batch (gradients are reduced across processes on the last one only). The first minibatch runs
before any update, so its ``ratio`` statistics must be 1: the on-policy check. A minibatch whose
loss or gradient norm is not finite on any process takes no step (its gradient never reaches the
weights or the optimizer state) and is counted as skipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mixgrpo.core import metrics as m

if TYPE_CHECKING:
    from mixgrpo.core.trainer import Trainer

log = logging.getLogger(__name__)

#: ``losses(key, rows) -> (terms [M] with grad, stats {name: [M]})`` for one micro-batch
Losses = Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class OptimizerSteps:
    """One iteration's optimizer steps for ``trainer`` (its optimizer, parallel layout and EMA), and
    the sums its policy metrics are made of."""

    def __init__(self, trainer: Trainer, iteration: int) -> None:
        self.trainer, self.iteration = trainer, iteration
        self.params = trainer.backbone.trainable_parameters()
        self.sums: dict[str, float] = defaultdict(float)
        self.items, self.first_dev, self.skipped = 0, 0.0, 0
        self.grad_norms: list[float] = []

    def step(self, index: int, chunks: Sequence[tuple[Hashable, torch.Tensor]], total: int, losses: Losses) -> None:
        """Minibatch ``index`` (0-based): ``chunks`` of ``(key, rows)`` micro-batches holding ``total``
        loss terms in all; ``losses`` computes each micro-batch's terms and statistics."""
        t = self.trainer
        t.optimizer.zero_grad(set_to_none=True)
        loss_finite = True
        for j, (key, rows) in enumerate(chunks):
            last = j == len(chunks) - 1  # gradients are reduced across processes on the last one
            with contextlib.nullcontext() if last else t.parallel.no_sync(t.backbone.module):
                terms, stats = losses(key, rows)
                loss = terms.sum() / total
                loss_finite &= bool(torch.isfinite(loss.detach()))
                t.accelerator.backward(loss)
            for name, value in stats.items():
                self.sums[name] += float(value.detach().float().sum())
            self.items += len(rows)
            if index == 0:
                self.first_dev = max(self.first_dev, float((stats["ratio"] - 1).abs().max()))
        self._update(loss_finite, index)

    def _update(self, loss_finite: bool, index: int) -> None:
        """The optimizer step on the accumulated gradients (clipped; the EMA follows), or none when
        the loss or the gradient norm is not finite on any process (the gradients are dropped)."""
        t = self.trainer
        grad_norm = t.parallel.clip_grad_norm(self.params, t.config.max_grad_norm)
        if not (math.isfinite(grad_norm) and t.parallel.all_processes(loss_finite)):
            t.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            log.warning("iteration %d, minibatch %d: non-finite %s; the optimizer step is skipped",
                        self.iteration + 1, index + 1, "loss" if not loss_finite else f"gradient norm ({grad_norm})")
            return
        self.grad_norms.append(grad_norm)
        t.optimizer.step()
        if t.ema is not None:
            t.ema.step(self.params)

    def metrics(self, nfe_train: float) -> dict[str, float]:
        """The ``policy/*`` row, after warning when the first minibatch was off-policy."""
        tolerance = self.trainer.ratio_tolerance
        if self.first_dev > tolerance:
            log.warning("on-policy ratio deviates from 1 by %.2e before the first update (tolerance %.0e, a tenth "
                        "of the clip range by default): rollout and training compute different log-probs",
                        self.first_dev, tolerance)
        means = {k: v / max(self.items, 1) for k, v in self.sums.items()}
        return m.policy_row(means, self.first_dev, self.grad_norms, self.skipped, nfe_train=nfe_train)
