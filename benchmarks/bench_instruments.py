"""Instruments fitted to a trainer from outside: network evaluations counted at the network, split
into rollout and training, and the optimizer step timed.

Part of ``benchmarks/iteration_time.py`` (the entry point); see docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA only), so that a wall-clock interval covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Instruments:
    """Counts network evaluations (rows through the network, so a CFG call counts 2) in the rollout
    and in training, and times the optimizer step, from outside the trainer.

    The rollout/training boundary is the start of ``Trainer.optimize``: rows before it are rollout
    rows, rows after it training rows (reference-model rows included: a full fine-tune's reference is
    a frozen copy of the network, swapped in by ``Backbone.reference()``, and is counted while it is in).
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.device = trainer.backbone.device
        self.rows = 0
        self.rollout_rows: int | None = None
        self.train_nograd_rows = 0  # training rows without gradients (velocities before an update, references)
        self.optimizer_s = 0.0
        self._network = self._current_network()
        self._hook = self._network.register_forward_pre_hook(self._count, with_kwargs=True)
        trainer.optimize = self._marking(trainer.optimize)
        trainer.backbone.reference = self._counting_reference(trainer.backbone.reference)
        step = trainer.optimizer.step

        def timed_step(*a: Any, **k: Any) -> Any:
            synchronize(self.device)  # the backward's kernels belong to training, not to the step
            t0 = time.perf_counter()
            out = step(*a, **k)
            synchronize(self.device)
            self.optimizer_s += time.perf_counter() - t0
            return out

        trainer.optimizer.step = timed_step

    def _current_network(self) -> Any:
        """The network ``velocity`` runs now, without the trainer's wrappers."""
        backbone = self.trainer.backbone
        return backbone.unwrapped() if hasattr(backbone, "unwrapped") else backbone.module

    def _counting_reference(self, reference: Callable) -> Callable:
        """``reference`` that also counts the rows of the network it swaps in (a frozen copy); under
        LoRA the reference is the counted network with its adapters off, counted once."""

        @contextlib.contextmanager
        def counted(*args: Any, **kwargs: Any) -> Iterator[None]:
            with reference(*args, **kwargs):
                network = self._current_network()
                hook = None if network is self._network else network.register_forward_pre_hook(
                    self._count, with_kwargs=True)
                try:
                    yield
                finally:
                    if hook is not None:
                        hook.remove()

        return counted

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states")
        if x is None:
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None:
            x = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.rows += int(x.shape[0])
        if self.rollout_rows is not None and not torch.is_grad_enabled():
            self.train_nograd_rows += int(x.shape[0])

    def _marking(self, optimize: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.rollout_rows is None:
                self.rollout_rows = self.rows
            return optimize(*args, **kwargs)

        return call

    def reset(self) -> None:
        """Zero the counts and the optimizer time (and CUDA's peak memory) before an iteration."""
        self.rows, self.rollout_rows, self.optimizer_s, self.train_nograd_rows = 0, None, 0.0, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def close(self) -> None:
        """Remove the counting hook from the network and the counting from ``reference``."""
        self._hook.remove()
        del self.trainer.backbone.reference  # the instance attribute: the class's method is back
