"""Group-relative advantages (docs/algorithms.md §7).

One advantage per sample, shared by all its trained steps::

    A_n = (r_n − mean_{g(n)}) / (std + eps),    then clamped to ±clip

where the mean is over the sample's group (the samples of one prompt) and the std is either the
group's (``std="group"``: DanceGRPO, MixGRPO) or that of all rewards of the batch
(``std="global"``: FlowGRPO). With several rewards, ``aggregate="advantage"`` (MixGRPO) normalizes
each reward and averages the advantages with weights summing to 1, while ``aggregate="reward"``
(FlowGRPO) sums the weighted raw rewards and normalizes once.

Failed rewards are NaN: they are left out of their group's statistics and contribute 0 advantage.

Distributed use: pass the rewards and group ids gathered from all processes (so a group that spans
processes, and the global std, see the whole batch), then keep this process's rows with
``local_rows``. When every group lives on one process (group std), the local rows alone give the
same result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

STD_MODES = ("group", "global")
AGGREGATES = ("advantage", "reward")


# -- input checks ----------------------------------------------------------------------------------
def _as_named(rewards: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(rewards, torch.Tensor):
        return {"reward": rewards}
    if not isinstance(rewards, Mapping):
        raise ValueError(f"rewards must be a tensor [N] or a dict {{name: tensor [N]}}, got {type(rewards).__name__}")
    if not rewards:
        raise ValueError("rewards is an empty dict: pass at least one reward")
    return {str(k): torch.as_tensor(v) for k, v in rewards.items()}


def _check_shapes(named: dict[str, torch.Tensor], group_ids: torch.Tensor) -> None:
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [N], got shape {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be integers, got dtype {group_ids.dtype}")
    for name, r in named.items():
        if r.shape != group_ids.shape:
            raise ValueError(
                f"reward {name!r} has shape {tuple(r.shape)} but group_ids has {tuple(group_ids.shape)}: "
                "one reward per sample expected"
            )


def _resolve_weights(named: dict[str, torch.Tensor], weights: Mapping[str, float] | None,
                     bare: bool) -> dict[str, float]:
    """Weights for every reward (default 1 each); names must match the rewards exactly."""
    if weights is None:
        return {name: 1.0 for name in named}
    if bare:
        raise ValueError("weights need named rewards: pass rewards as a dict {name: tensor}")
    unknown = sorted(set(weights) - set(named))
    if unknown:
        raise ValueError(f"weights name unknown rewards {unknown}; rewards are {sorted(named)}")
    missing = sorted(set(named) - set(weights))
    if missing:
        raise ValueError(f"rewards {missing} have no weight; weights are given for {sorted(weights)}")
    out = {name: float(weights[name]) for name in named}
    if not all(math.isfinite(w) for w in out.values()):
        raise ValueError(f"weights must be finite, got {out}")
    return out


# -- the normalization of one reward ---------------------------------------------------------------
def _normalize(r: torch.Tensor, group_ids: torch.Tensor, std: str, ddof: float, eps: float) -> torch.Tensor:
    """z-scores ``[N]`` float64 of one reward ``r`` ``[N]``; 0 where undefined or NaN.

    Undefined means: a NaN reward, a group (``std="group"``) or batch (``std="global"``) with no
    more valid samples than ``ddof`` (e.g. a group of one with ddof 1), or a std that is exactly 0
    (all valid rewards equal: no signal, and no 0/0 even with eps = 0).
    """
    r = r.detach().to(torch.float64).cpu()
    _, inverse = torch.unique(group_ids.cpu(), return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    valid = ~torch.isnan(r)
    filled = torch.where(valid, r, torch.zeros_like(r))
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, valid.double())
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, filled)
    mean = total / count.clamp(min=1)
    dev = torch.where(valid, r - mean[inverse], torch.zeros_like(r))
    if std == "group":
        sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, dev * dev)
        spread = (sq / (count - ddof).clamp(min=1e-300)).sqrt()
        defined = (count > ddof) & (spread > 0) & ~_constant_groups(filled, valid, inverse, num_groups)
        spread, defined = spread[inverse], defined[inverse]
    else:
        ok = filled[valid]
        n = ok.numel()
        spread_value = float(((ok - ok.mean()) ** 2).sum() / (n - ddof)) ** 0.5 if n > ddof else 0.0
        all_equal = n == 0 or bool(ok.max() == ok.min())
        spread = torch.full_like(r, spread_value)
        defined = torch.full_like(valid, n > ddof and spread_value > 0 and not all_equal)
    adv = dev / (spread + eps)
    return torch.where(valid & defined, adv, torch.zeros_like(adv))


def _constant_groups(filled: torch.Tensor, valid: torch.Tensor, inverse: torch.Tensor,
                     num_groups: int) -> torch.Tensor:
    """Bool ``[G]``: True where all valid rewards of the group are equal (or there are none)."""
    inf = torch.full((num_groups,), math.inf, dtype=filled.dtype)
    high = (-inf).scatter_reduce(0, inverse, torch.where(valid, filled, -math.inf), "amax")
    low = inf.scatter_reduce(0, inverse, torch.where(valid, filled, math.inf), "amin")
    return ~(high > low)


# -- public API ------------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor | Mapping[str, torch.Tensor],
    group_ids: torch.Tensor,
    *,
    std: str = "group",
    ddof: float = 1,
    eps: float = 1e-8,
    weights: Mapping[str, float] | None = None,
    aggregate: str = "advantage",
    clip: float | None = 5.0,
) -> torch.Tensor:
    """One advantage per sample from one or several rewards.

    Args:
        rewards: a tensor ``[N]`` or a dict ``{name: tensor [N]}`` (any float dtype); NaN marks a
            sample the reward could not score.
        group_ids: ``[N]`` integer group (prompt) of each sample.
        std: ``"group"``: divide by each group's std; ``"global"``: by the std of all valid
            rewards of the batch (FlowGRPO). The mean is always the group's.
        ddof: delta degrees of freedom of the std (1: unbiased, DanceGRPO/MixGRPO; 0: population,
            FlowGRPO). A group with no more valid samples than ``ddof`` (a group of one with
            ddof 1) has an undefined std: its advantages are 0.
        eps: added to the std in the denominator. A group whose valid rewards are all equal gets
            advantage 0 (not NaN, also with eps = 0).
        weights: ``{name: weight}`` for every reward (default: 1 each). ``aggregate="advantage"``
            normalizes them to sum to 1; ``aggregate="reward"`` uses them as given.
        aggregate: ``"advantage"`` (MixGRPO): the weighted average of per-reward advantages (a
            sample's NaN reward contributes 0 to it); ``"reward"`` (FlowGRPO): the weighted sum of
            raw rewards normalized once (a NaN in any reward excludes the sample: advantage 0).
        clip: clamp the final advantages to ``±clip``; ``None`` disables it.
    Returns:
        ``[N]`` float32 on the device of ``group_ids``.
    Raises:
        ValueError: mismatched shapes, unknown ``std`` or ``aggregate``, weights that name unknown
            rewards or miss one, weights summing to 0 under ``aggregate="advantage"``.
    """
    if std not in STD_MODES:
        raise ValueError(f"unknown std mode {std!r}; valid: {', '.join(STD_MODES)}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; valid: {', '.join(AGGREGATES)}")
    if not ddof >= 0:
        raise ValueError(f"ddof must be >= 0, got {ddof}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    bare = isinstance(rewards, torch.Tensor)
    named = _as_named(rewards)
    group_ids = torch.as_tensor(group_ids)
    _check_shapes(named, group_ids)
    w = _resolve_weights(named, weights, bare)

    if aggregate == "reward":
        total = sum(w[name] * r.detach().to(torch.float64).cpu() for name, r in named.items())
        adv = _normalize(total, group_ids, std, ddof, eps)
    else:
        norm = sum(w.values())
        if not norm > 0:
            raise ValueError(f"weights must sum to a positive number under aggregate='advantage', got {w}")
        adv = sum((w[name] / norm) * _normalize(r, group_ids, std, ddof, eps) for name, r in named.items())
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(device=group_ids.device, dtype=torch.float32)


def zero_std_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Fraction of groups whose valid rewards all agree (std 0: no learning signal).

    Args:
        rewards: ``[N]`` float; NaN entries are ignored.
        group_ids: ``[N]`` integer group ids.
    Returns:
        The fraction over groups with at least one valid reward (a group with a single valid
        reward counts as std 0); NaN when no group has one.
    """
    rewards, group_ids = torch.as_tensor(rewards), torch.as_tensor(group_ids)
    _check_shapes({"reward": rewards}, group_ids)
    r = rewards.detach().to(torch.float64).cpu()
    _, inverse = torch.unique(group_ids.cpu(), return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    valid = ~torch.isnan(r)
    has_valid = torch.zeros(num_groups, dtype=torch.bool).index_fill_(0, inverse[valid], True)
    constant = _constant_groups(torch.where(valid, r, torch.zeros_like(r)), valid, inverse, num_groups)
    if not bool(has_valid.any()):
        return float("nan")
    return float((constant & has_valid).sum()) / float(has_valid.sum())


def local_rows(all_ids: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
    """Positions in ``all_ids`` of each of ``local_ids``, in the order of ``local_ids``.

    For distributed use: compute advantages on the rewards gathered from all processes, then
    ``adv_all[local_rows(all_sample_ids, my_sample_ids)]`` are this process's advantages.

    Args:
        all_ids: ``[N]`` integer sample ids of the gathered batch (unique).
        local_ids: ``[n]`` integer sample ids held by this process.
    Returns:
        ``[n]`` long indices into ``all_ids``.
    Raises:
        ValueError: duplicate ids in ``all_ids`` or a local id missing from it.
    """
    all_list = torch.as_tensor(all_ids).reshape(-1).tolist()
    where = {int(s): n for n, s in enumerate(all_list)}
    if len(where) != len(all_list):
        raise ValueError("all_ids holds duplicate ids: pass unique (global sample) ids")
    local = torch.as_tensor(local_ids).reshape(-1).tolist()
    missing = [s for s in local if int(s) not in where]
    if missing:
        raise ValueError(f"local ids {missing[:10]} are not in the gathered ids")
    return torch.tensor([where[int(s)] for s in local], dtype=torch.long)
