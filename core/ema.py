"""An exponential moving average of the trainable weights, used for evaluation (FlowGRPO reports
its SD3.5 results with one).

After optimizer step n (0-based, counted over the whole run), every ``interval``-th step updates
``ema ← ema + (1 − d_n)·(θ − ema)`` with the warm-up decay ``d_n = min((1 + n)/(10 + n), decay)``,
so early averages are not dominated by the base weights. FlowGRPO's SD3.5 recipe uses
``decay = 0.9`` and ``interval = 8``. The average is kept in fp32 beside the (possibly sharded)
parameters; ``applied()`` swaps it in for evaluation and swaps the training weights back after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class EMA:
    """Moving average of ``parameters`` (a fixed, ordered list: the optimizer's parameters).

    Args:
        parameters: the trainable parameters.
        decay: the decay's ceiling, in [0, 1).
        interval: optimizer steps between two updates (>= 1).
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float, interval: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {decay}")
        if interval < 1:
            raise ValueError(f"TrainConfig.ema_interval must be >= 1, got {interval}")
        self.decay, self.interval = float(decay), int(interval)
        self.shadow = [p.detach().float().clone() for p in parameters]
        self.num_steps = 0  # optimizer steps seen

    def current_decay(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def step(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Account for one optimizer step of ``parameters`` (updating the average on every
        ``interval``-th)."""
        n = self.num_steps
        self.num_steps += 1
        if (n + 1) % self.interval:
            return
        weight = 1.0 - self.current_decay(n)
        for avg, p in zip(self.shadow, parameters, strict=True):
            avg.add_(p.detach().float() - avg, alpha=weight)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """Inside, ``parameters`` hold the average; afterwards their own values again, bit for bit."""
        saved = [p.detach().clone() for p in parameters]
        for avg, p in zip(self.shadow, parameters, strict=True):
            p.copy_(avg.to(p.dtype))
        try:
            yield
        finally:
            for value, p in zip(saved, parameters, strict=True):
                p.copy_(value)
