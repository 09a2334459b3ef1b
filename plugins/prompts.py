"""Prompt sets: the procedural shapes world and plain text files.

A prompt set is called as ``prompts(split, count, seed) -> list[str]``; ``split`` is ``"train"``
or ``"eval"`` and the two never share a prompt.
"""

from __future__ import annotations

import random
from pathlib import Path

from mixgrpo.core.hookspecs import hookimpl

SPLITS = ("train", "eval")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; splits: {', '.join(SPLITS)}")


class ShapesPrompts:
    """Prompts of the procedural shapes world (GenEval-like), generated under a seed.

    Args:
        levels: difficulty levels to draw from (1 single object, 2 counting, 3 two objects,
            4 relative position).
    """

    def __init__(self, levels: tuple[int, ...] = (1, 2, 3, 4)) -> None:
        self.levels = tuple(levels)

    def __call__(self, split: str, count: int, seed: int) -> list[str]:
        _check_split(split)
        from mixgrpo.plugins.world.shapes import sample_prompts

        return sample_prompts(split, count, seed, levels=self.levels)


class FilePrompts:
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
        if not self.train or not self.eval:
            raise ValueError(f"{train_path}: need prompts for both splits (train={len(self.train)}, "
                             f"eval={len(self.eval)}); add lines or pass eval_path")

    @staticmethod
    def _read(path: str) -> list[str]:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"prompt file {path!r} not found")
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]

    def __call__(self, split: str, count: int, seed: int) -> list[str]:
        _check_split(split)
        pool = self.train if split == "train" else self.eval
        rng = random.Random(seed)
        if split == "eval":  # a fixed, ordered selection so evaluations compare like with like
            return [pool[k % len(pool)] for k in range(count)]
        return [rng.choice(pool) for _ in range(count)]


@hookimpl
def register_prompt_sets(register):
    register("shapes", ShapesPrompts)
    register("file", FilePrompts)
