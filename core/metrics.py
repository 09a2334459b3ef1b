"""The names of everything a run records: one row per iteration in ``metrics.jsonl`` and TensorBoard.

Fixed names, as cleanrl's: the trainer writes them, the compare report, the model card, the
benchmark and the tests read them, and all of them take the names from here. ``NAMES`` is the
documented list (docs/run-directory.md); ``<name>`` stands for a reward's registered name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

ITERATION = "iteration"

# -- the trained rewards, over every process's samples of the iteration ---------------------------
REWARD_STATS = ("mean", "std", "failed", "zero_std_groups")


def reward(name: str, stat: str) -> str:
    """``reward/<name>/<stat>``: ``mean`` and ``std`` of the finite scores, ``failed`` the number of
    masked samples (an exception, NaN or Inf), ``zero_std_groups`` the fraction of groups whose
    scores are all equal (no advantage signal)."""
    if stat not in REWARD_STATS:
        raise KeyError(f"unknown reward statistic {stat!r}; one of {REWARD_STATS}")
    return f"reward/{name}/{stat}"


# -- held-out evaluation (deterministic ODE sampling, trained and evaluation-only rewards) ----------
EVAL_STATS = ("mean", "sem")


def evaluation(name: str, stat: str) -> str:
    """``eval/<name>/<stat>``: the mean held-out score and its standard error over the images."""
    if stat not in EVAL_STATS:
        raise KeyError(f"unknown evaluation statistic {stat!r}; one of {EVAL_STATS}")
    return f"eval/{name}/{stat}"


def evaluated_rewards(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The reward names with a held-out mean in ``rows``, in order of first appearance (the model's
    own measures of ``MODEL_MEASURES``, under ``eval/`` too, are no rewards)."""
    return list(dict.fromkeys(name for row in rows for key in row
                              if key.startswith("eval/") and key.endswith("/mean")
                              and (name := key[len("eval/"):-len("/mean")]) not in MODEL_MEASURES))


# -- held-out measures of the model itself, beside its rewards (reward hacking: core/hacking.py) ------
DIVERSITY_MEAN = "eval/diversity/mean"  # mean pairwise distance of a prompt's images over the sampling seeds
DIVERSITY_SEM = "eval/diversity/sem"  # ... its standard error over the held-out prompts
KL_BASE_MEAN = "eval/kl_base/mean"  # mean (v_θ − v_base)² on the held-out trajectories: the drift from the base
#: the ``eval/<x>/...`` names that are measures of the model, not rewards (no reward may be named so)
MODEL_MEASURES = ("diversity", "kl_base")


# -- the policy update ------------------------------------------------------------------------------
RATIO_MEAN = "policy/ratio_mean"
CLIPFRAC = "policy/clipfrac"
APPROX_KL = "policy/approx_kl"
ONPOLICY_RATIO_DEV = "policy/onpolicy_ratio_dev"  # max |ratio − 1| before the first update: must be ~0
GRAD_NORM = "policy/grad_norm"
SKIPPED_STEPS = "policy/skipped_steps"  # optimizer steps skipped for a non-finite loss or gradient
LOSS_POLICY = "loss/policy"
LOSS_KL = "loss/kl"
#: what the optimisation of one iteration reports (NaN when it trained nothing)
POLICY = (RATIO_MEAN, CLIPFRAC, APPROX_KL, ONPOLICY_RATIO_DEV, GRAD_NORM, LOSS_POLICY, LOSS_KL)


def policy_row(mean: Mapping[str, float], onpolicy_dev: float, grad_norms: list[float], skipped: int,
               nfe_train: float) -> dict[str, float]:
    """The policy metrics of an iteration's optimizer steps, from the objective's per-transition
    statistics averaged over the trained transitions (``mean``: ``ratio``, ``clipped``,
    ``approx_kl``, ``policy``, ``kl``), the on-policy deviation, the unskipped steps' gradient
    norms, the number of skipped steps and the training NFE per sample."""
    nan = float("nan")
    return {
        RATIO_MEAN: mean.get("ratio", nan), CLIPFRAC: mean.get("clipped", nan), APPROX_KL: mean.get("approx_kl", nan),
        ONPOLICY_RATIO_DEV: onpolicy_dev, GRAD_NORM: sum(grad_norms) / len(grad_norms) if grad_norms else nan,
        SKIPPED_STEPS: float(skipped), LOSS_POLICY: mean.get("policy", nan), LOSS_KL: mean.get("kl", 0.0),
        NFE_TRAIN: nfe_train,
    }

# -- off-policy replay (an objective with a ReplaySpec, core/replay.py; absent otherwise) ------------
REPLAY_FRACTION = "replay/fraction"  # share of the iteration's samples that replayed a stored prefix
REPLAY_WEIGHT_MEAN = "replay/weight_mean"  # their sequence-level importance weights (NaN when none replayed)
REPLAY_WEIGHT_MAX = "replay/weight_max"
REPLAY_BUFFER = "replay/buffer_size"  # prompts held in the buffer after the iteration
REPLAY = (REPLAY_FRACTION, REPLAY_WEIGHT_MEAN, REPLAY_WEIGHT_MAX, REPLAY_BUFFER)

# -- the window of the iteration's plan (-1, 0 without one) -----------------------------------------
WINDOW_START = "window/start"
WINDOW_SIZE = "window/size"

# -- cost ---------------------------------------------------------------------------------------------
NFE_ROLLOUT = "perf/nfe_rollout"  # network evaluations per sample in the rollout (a CFG call counts 2)
NFE_TRAIN = "perf/nfe_train"  # ... and in training (a reference-model call counts 1)
ROLLOUT_S = "perf/rollout_s"
REWARD_S = "perf/reward_s"  # scoring not hidden behind the rollout (all of it unless overlap_rewards), advantages
TRAIN_S = "perf/train_s"
ITERATION_S = "perf/iteration_s"
PEAK_MEM_GB = "perf/peak_mem_gb"

#: every name ``metrics.jsonl`` may hold; nothing else is written there
NAMES = (
    ITERATION, *(reward("<name>", s) for s in REWARD_STATS), *(evaluation("<name>", s) for s in EVAL_STATS),
    DIVERSITY_MEAN, DIVERSITY_SEM, KL_BASE_MEAN,
    RATIO_MEAN, CLIPFRAC, APPROX_KL, ONPOLICY_RATIO_DEV, GRAD_NORM, SKIPPED_STEPS, LOSS_POLICY, LOSS_KL,
    *REPLAY, WINDOW_START, WINDOW_SIZE, NFE_ROLLOUT, NFE_TRAIN, ROLLOUT_S, REWARD_S, TRAIN_S, ITERATION_S, PEAK_MEM_GB,
)


def format_value(value: float, digits: int = 3) -> str:
    """A score on its own: ``digits`` significant digits (``0.457``, ``1.23e-05``), ``n/a`` if not finite."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"
