"""Prompt sets: the procedural shapes world and plain text files.

A prompt set is called as ``prompts(split, count, seed, iteration=None) -> list[str]``; ``split``
is ``"train"`` or ``"eval"`` and the two never share a prompt. The trainer asks for the training
prompts of iteration k with the run's seed and ``iteration=k``; evaluation asks without an
iteration and gets the same prompts every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import PromptSet
from mixgrpo.core.rollout import keyed_generator

SPLITS = ("train", "eval")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; splits: {', '.join(SPLITS)}")


class ShapesPrompts(PromptSet):
    """Prompts of the procedural shapes world (GenEval-like), generated under a seed.

    Args:
        levels: difficulty levels to draw from (1 single object, 2 counting, 3 two objects,
            4 relative position).
        pool: None (default): every training iteration draws new prompts. An integer P: training
            draws from P prompts generated once under the run's seed (each iteration ``count`` of them,
            distinct within the iteration), so prompts come back, as they do from a finite dataset
            (what a replay buffer keyed by prompt needs). The held-out prompts are the same either way.
    """

    training_only: ClassVar[tuple[str, ...]] = ("pool",)  # PromptSet.training_only

    def __init__(self, levels: tuple[int, ...] = (1, 2, 3, 4), pool: int | None = None) -> None:
        self.levels = tuple(levels)
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
            raise ValueError(f"ShapesPrompts.pool must be a positive integer (prompts to draw from) or None, got "
                             f"{pool!r}")
        self.pool = pool

    def __call__(self, split: str, count: int, seed: int, iteration: int | None = None) -> list[str]:
        """``count`` generated prompts; with ``iteration``, those of that iteration of run ``seed``."""
        _check_split(split)
        from mixgrpo.plugins.world.shapes import sample_prompts

        if iteration is None:
            return sample_prompts(split, count, seed, levels=self.levels)
        if self.pool is not None:
            if count > self.pool:
                raise ValueError(f"ShapesPrompts.pool = {self.pool} holds fewer prompts than the {count} an iteration "
                                 f"draws (TrainConfig.prompts_per_iteration): raise the pool or draw fewer")
            pool = sample_prompts(split, self.pool, seed, levels=self.levels)
            pick = torch.randperm(self.pool, generator=keyed_generator(seed, iteration, "pool"))[:count]
            return [pool[k] for k in pick.tolist()]
        seed = int(torch.randint(2**31 - 1, (1,), generator=keyed_generator(seed, iteration, "prompts")))
        return sample_prompts(split, count, seed, levels=self.levels)


class FilePrompts(PromptSet):
    """Prompts read from text files, one per line (e.g. the HPDv2 train and test prompts).

    Args:
        train_path: file of training prompts.
        eval_path: file of held-out prompts; if omitted, the last ``eval_fraction`` of the train
            file is held out (and never drawn for training).
        eval_fraction: see above.
    """

    def __init__(self, train_path: str, eval_path: str | None = None, eval_fraction: float = 0.1) -> None:
        train = self._read(train_path)
        if eval_path is not None:
            self.train, self.eval = train, self._read(eval_path)
        else:
            cut = max(1, int(len(train) * (1 - eval_fraction)))
            self.train, self.eval = train[:cut], train[cut:]
        counts = f"train={len(self.train)}, eval={len(self.eval)}"
        if not self.train:  # the train file itself is empty, whether or not eval_path is bound
            raise ValueError(f"FilePrompts.train_path = {train_path!r}: the file holds no prompts (one per line, "
                             f"blank lines skipped), so the train split is empty ({counts}): need prompts for both "
                             f"splits; add training prompts to it or bind FilePrompts.train_path to another file")
        if eval_path is not None and not self.eval:
            raise ValueError(f"FilePrompts.eval_path = {eval_path!r}: the file holds no prompts (one per line, "
                             f"blank lines skipped), so the eval split is empty ({counts}): need prompts for both "
                             f"splits; add held-out prompts to it, or leave FilePrompts.eval_path unbound to hold "
                             f"out the last FilePrompts.eval_fraction of the train file")
        if not self.eval:  # no eval file, and nothing of the train file is held out
            raise_fraction = "raise FilePrompts.eval_fraction, " if len(train) > 1 else ""
            raise ValueError(f"FilePrompts.train_path = {train_path!r} holds {len(train)} prompt(s), too few to hold "
                             f"out FilePrompts.eval_fraction = {eval_fraction} of them for evaluation ({counts}): "
                             f"need prompts for both splits; add lines to it, {raise_fraction}or bind "
                             f"FilePrompts.eval_path to a file of held-out prompts")

    @staticmethod
    def _read(path: str) -> list[str]:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"prompt file {path!r} not found")
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]

    def __call__(self, split: str, count: int, seed: int, iteration: int | None = None) -> list[str]:
        """Evaluation: the first ``count`` held-out prompts, in file order (cycled when short), the
        same every time. Training: iteration k takes the next ``count`` prompts of the run's stream,
        the concatenation of one random permutation of the file per epoch (keyed by the run's seed
        and the epoch), so every prompt is drawn once per epoch and none twice within one."""
        _check_split(split)
        if split == "eval":  # a fixed, ordered selection so evaluations compare like with like
            return [self.eval[k % len(self.eval)] for k in range(count)]
        size = len(self.train)
        start = (iteration or 0) * count
        epochs: dict[int, list[int]] = {}
        out = []
        for position in range(start, start + count):
            epoch = position // size
            if epoch not in epochs:
                epochs[epoch] = torch.randperm(size, generator=keyed_generator(seed, "prompts", epoch)).tolist()
            out.append(self.train[epochs[epoch][position % size]])
        return out


@hookimpl
def register_prompt_sets(register):
    register("shapes", ShapesPrompts)
    register("file", FilePrompts)
