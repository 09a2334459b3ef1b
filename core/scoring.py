"""Scoring images with rewards: pure functions of the rewards, the images and the prompts.

A reward is any callable ``(images [N, 3, H, W] in [0, 1], prompts) -> N scores`` (the ``Reward``
interface). Whatever goes wrong in one is masked, loudly, and never scored as a plausible value:
an exception or scores of the wrong number or dtype mask every sample of the call, NaN or ±Inf mask
those samples. A masked sample is NaN here; the advantages leave it out of its group's statistics
and give it advantage 0. The trainer gathers the scores over its processes and calls ``statistics``.
A reward that declares ``uses_source_images`` (an editing reward) also receives ``sources=``: the
source image each ``EditPrompt`` carries, read here at the images' size (``source_images``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from mixgrpo.core import metrics as m
from mixgrpo.core.advantages import zero_std_fraction
from mixgrpo.core.interfaces import Reward, RewardUnavailable
from mixgrpo.core.types import EditPrompt

log = logging.getLogger(__name__)
_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class RewardFailure(RuntimeError):
    """A reward returned something that is not one finite score per image, or failed every sample."""


__all__ = ["ChunkScorer", "RewardFailure", "RewardUnavailable", "RewardWatch", "call_reward", "evaluate", "score",
           "oriented", "source_images", "statistics"]


def higher_is_better(reward: Reward | Any) -> bool:
    """A ``Reward`` says; a plain callable used as a reward scores higher for better images."""
    return reward.higher_is_better if isinstance(reward, Reward) else True


def oriented(rewards: Mapping[str, Reward | Any], scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``scores`` by reward name, each turned so that higher is better (a reward that declares
    ``higher_is_better = False`` enters negated): what training raises."""
    return {name: s if higher_is_better(rewards[name]) else -s for name, s in scores.items()}


def _as_scores(raw: Any, name: str, count: int) -> torch.Tensor:
    scores = torch.as_tensor(raw)
    if not (scores.is_floating_point() or scores.dtype in _INTEGER):
        raise RewardFailure(f"reward {name!r} returned scores of dtype {scores.dtype}; expected real numbers")
    scores = scores.detach().float().reshape(-1).cpu()
    if scores.numel() != count:
        raise RewardFailure(f"reward {name!r} returned {scores.numel()} scores for {count} images")
    return scores


def source_images(prompts: Sequence[str], height: int, width: int, name: str = "reward") -> torch.Tensor:
    """The source image of each prompt ``[N, 3, height, width]`` float32 in [0, 1] (``EditPrompt.pixels``);
    a prompt that carries none is an error naming the fix."""
    missing = [p for p in prompts if not isinstance(p, EditPrompt)]
    if missing:
        raise ValueError(f"reward {name!r} compares each image with its source image (uses_source_images), but "
                         f"prompt {str(missing[0])!r} carries none: train it with an editing prompt set, whose "
                         f"items are EditPrompt (an instruction with its image)")
    if not prompts:
        return torch.zeros(0, 3, height, width)
    return torch.stack([p.pixels(height, width) for p in prompts])


def _reward_inputs(reward: Reward, name: str, images: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
    """The keyword arguments of a reward call beyond (images, prompts): ``sources`` for a reward that
    asks for them, on the images' device; nothing for any other, which keeps its two-argument call."""
    if not (isinstance(reward, Reward) and reward.uses_source_images):
        return {}
    height, width = images.shape[-2:]
    return {"sources": source_images(prompts, int(height), int(width), name).to(images.device)}


def call_reward(reward: Reward, name: str, images: torch.Tensor, prompts: Sequence[str],
                errors: dict[str, BaseException] | None = None) -> torch.Tensor:
    """Scores ``[N]`` float32 on the CPU, NaN where masked. ``errors`` receives the exception of a
    call that scored no sample (a reward asking for source images whose prompts carry none included)."""
    try:
        prompts = list(prompts)
        scores = _as_scores(reward(images, prompts, **_reward_inputs(reward, name, images, prompts)), name,
                            len(prompts))
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


def score(rewards: Mapping[str, Reward], images: torch.Tensor, prompts: Sequence[str],
          errors: dict[str, BaseException] | None = None) -> dict[str, torch.Tensor]:
    """Every reward's scores of ``images`` (``call_reward`` each)."""
    return {name: call_reward(reward, name, images, prompts, errors) for name, reward in rewards.items()}


def statistics(scores: Mapping[str, torch.Tensor], group_ids: torch.Tensor) -> dict[str, float]:
    """``reward/<name>/{mean,std,failed,zero_std_groups}`` of scores over all of an iteration's
    samples (masked samples are counted in ``failed`` and left out of the others)."""
    out: dict[str, float] = {}
    for name, s in scores.items():
        ok = s[~s.isnan()]
        out[m.reward(name, "mean")] = ok.mean().item() if ok.numel() else float("nan")
        out[m.reward(name, "std")] = ok.std(unbiased=False).item() if ok.numel() else float("nan")
        out[m.reward(name, "failed")] = float(s.isnan().sum())
        out[m.reward(name, "zero_std_groups")] = zero_std_fraction(s, group_ids)
    return out


def evaluate(rewards: Mapping[str, Reward], images: torch.Tensor, prompts: Sequence[str],
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
        out[m.evaluation(name, "mean")] = ok.mean().item() if n else float("nan")
        out[m.evaluation(name, "sem")] = (ok.std().item() / math.sqrt(n)) if n > 1 else float("nan")
    return out


class ChunkScorer:
    """Scores each rollout chunk's images as the rollout hands them over: at once, or in a background
    thread (``TrainConfig.overlap_rewards``). The reward calls and their images are the same either
    way, so are the scores. ``inline_s`` is the scoring time spent inside the rollout; ``errors``
    the exception of each reward call that scored nothing."""

    def __init__(self, rewards: Mapping[str, Reward], prompts: Sequence[str], background: bool = False) -> None:
        self.rewards, self.prompts = rewards, list(prompts)
        self.scores = {name: torch.full((len(prompts),), float("nan")) for name in rewards}
        self.errors: dict[str, BaseException] = {}
        self.inline_s = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mixgrpo-reward") if background else None
        self._pending: list[Future] = []

    def __enter__(self) -> ChunkScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, images: torch.Tensor, rows: slice) -> None:
        if self._pool is not None:
            self._pending.append(self._pool.submit(self._score, images, rows))
        else:
            t = time.perf_counter()
            self._score(images, rows)
            self.inline_s += time.perf_counter() - t

    def _score(self, images: torch.Tensor, rows: slice) -> None:
        for name, s in score(self.rewards, images, self.prompts[rows], self.errors).items():
            self.scores[name][rows] = s

    def wait(self) -> dict[str, torch.Tensor]:
        """Every sample's scores, once every chunk is scored (a failure other than the reward's own,
        which ``score`` masks, is raised here)."""
        for future in self._pending:
            future.result()
        return self.scores


class RewardWatch:
    """Decides, iteration by iteration, whether the trained rewards still score: an iteration in
    which one scored no sample trains nothing; ``max_failed`` such iterations in a row, or a reward
    that is unavailable (``RewardUnavailable`` on any process), stop the run."""

    def __init__(self, names: Sequence[str], samples: int, max_failed: int) -> None:
        self.names, self.samples, self.max_failed = list(names), samples, max_failed
        self.streak = 0  # consecutive iterations in which a trained reward scored nothing

    def check(self, iteration: int, metrics: Mapping[str, float], errors: Mapping[str, BaseException],
              everywhere: Callable[[bool], bool]) -> tuple[bool, RewardFailure | None]:
        """``(train nothing, failure)`` for 1-based ``iteration``; ``everywhere(flag)`` is the
        collective that makes every process decide alike."""
        dead = [name for name in self.names if metrics[m.reward(name, "failed")] >= self.samples]
        self.streak = self.streak + 1 if dead else 0
        gone = [name for name, e in errors.items() if isinstance(e, RewardUnavailable)]
        unavailable = not everywhere(not gone)
        if dead:
            log.warning("iteration %d: reward(s) %s scored no sample; the iteration trains nothing (%d of %d "
                        "allowed in a row)", iteration, ", ".join(dead), self.streak, self.max_failed)
        if not (unavailable or self.streak >= self.max_failed):
            return bool(dead), None
        name = (gone or dead or self.names)[0]
        cause = errors.get(name)
        why = ("is unavailable" if unavailable else f"scored no sample in {self.streak} consecutive iterations "
               f"(TrainConfig.max_failed_iterations = {self.max_failed})")
        told = f"{type(cause).__name__}: {cause}" if cause else "non-finite scores (or on another process)"
        failure = RewardFailure(f"reward {name!r} {why}; the cause: {told}")
        failure.__cause__ = cause
        return True, failure
