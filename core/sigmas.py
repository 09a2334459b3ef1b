"""σ grids: the static shift, FLUX's dynamic (mu) shift, a diffusers-parity preset, and the
MixGRPO-Flash grid compressed after the window (docs/algorithms.md §2 and §6).

Grids are computed in float64 and returned as fp32 1-D tensors of T+1 values from 1 to 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

GRID_KINDS = ("static", "dynamic", "diffusers")


def shift_time(u: np.ndarray | float, shift: float) -> np.ndarray | float:
    """The static shift ``σ = s·u / (1 + (s−1)·u)`` of unshifted time ``u`` in [0, 1]."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift parameter ``mu`` (linear in the image token count)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def sigma_grid(num_steps: int, shift: float = 3.0, *, kind: str = "static", mu: float | None = None,
               shift_terminal: float | None = None) -> torch.Tensor:
    """The σ grid ``σ_0 = 1 > … > σ_T = 0`` of ``num_steps`` steps.

    Args:
        num_steps: T ≥ 1.
        shift: s of the static shift (``kind="static"`` or ``"diffusers"``).
        kind: ``"static"`` (the training grid of all three references, ``u_k = 1 − k/T`` then
            shifted), ``"dynamic"`` (FLUX inference: ``σ = e^mu / (e^mu + 1/u − 1)``, needs ``mu``),
            or ``"diffusers"`` (parity with ``FlowMatchEulerDiscreteScheduler.set_timesteps``, which
            shifts σ_min twice: FlowGRPO's SD3.5 10-step grid ends …, .278, .0089, 0).
        mu: the dynamic shift parameter (see ``flux_mu``).
        shift_terminal: if set, the grid before its final 0 is stretched so that its last nonzero σ
            is this value, ``σ' = 1 − (1 − σ)·(1 − shift_terminal)/(1 − σ_{T−1})`` (diffusers'
            ``stretch_shift_to_terminal``; Qwen-Image's scheduler uses 0.02); in (0, 1).
    Returns:
        fp32 tensor ``[num_steps + 1]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if kind == "static":
        u = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
        sig = shift_time(u, shift)
    elif kind == "dynamic":
        if mu is None:
            raise ValueError("kind='dynamic' needs mu (see mixgrpo.core.sigmas.flux_mu)")
        u = 1.0 - np.arange(num_steps, dtype=np.float64) / num_steps
        sig = np.append(math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0)), 0.0)
    elif kind == "diffusers":
        sigma_min = shift_time(1.0 / 1000, shift)  # the scheduler's shifted training σ_min
        u = np.linspace(1.0, sigma_min, num_steps)
        sig = np.append(shift_time(u, shift), 0.0)
    else:
        raise ValueError(f"unknown grid kind {kind!r}; known kinds: {', '.join(GRID_KINDS)}")
    sig[-1] = 0.0
    if shift_terminal is not None:
        if not 0.0 < shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must be in (0, 1), got {shift_terminal}")
        if num_steps < 2:
            raise ValueError("shift_terminal needs a grid of at least 2 steps (a nonzero σ besides σ_0 to stretch)")
        sig[:-1] = 1.0 - (1.0 - sig[:-1]) * (1.0 - shift_terminal) / (1.0 - sig[-2])
    return torch.tensor(sig, dtype=torch.float32)


def num_post_window_points(num_steps: int, window_end: int, ratio: float) -> int:
    """``n_post = max(int((T − L)·r), 2)``: points of the compressed grid after the window.

    The reference uses ``max(…, 1)``, which can stop short of σ = 0 near the end; the guard ≥ 2
    keeps the last point at 0 (docs/algorithms.md §6).
    """
    return max(int((num_steps - window_end) * ratio), 2)


def compressed_grid(num_steps: int, shift: float, window: tuple[int, int], ratio: float) -> torch.Tensor:
    """The MixGRPO-Flash grid: unchanged up to the end of the window, compressed after it.

    With window ``(l, w)`` and its last step ``L = l + w − 1``, the grid keeps σ_0 … σ_{L+1} and then
    walks ``linspace(u_{L+1}, 0, n_post)`` in unshifted time, shifted. Steps before the window are
    never compressed (that collapses training, paper: HPS .335 vs .358).

    Returns:
        fp32 tensor ``[L + 1 + n_post]`` (``[T + 1]`` when the window reaches the last step or
        ``ratio >= 1``).
    """
    start, size = window
    last = start + size - 1
    if not 0 <= start <= last < num_steps:
        raise ValueError(f"window {window} does not fit a grid of {num_steps} steps")
    if not 0 < ratio:
        raise ValueError(f"compression ratio must be > 0, got {ratio}")
    full = sigma_grid(num_steps, shift)
    if last + 1 >= num_steps or ratio >= 1:
        return full
    n_post = num_post_window_points(num_steps, last, ratio)
    if n_post - 1 >= num_steps - (last + 1):  # compression would not remove a step
        return full
    u_end = 1.0 - (last + 1) / num_steps
    post = shift_time(np.linspace(u_end, 0.0, n_post), shift)
    head = full[: last + 2].double().numpy()
    grid = np.concatenate([head, post[1:]])
    grid[-1] = 0.0
    return torch.tensor(grid, dtype=torch.float32)


def rollout_nfe(grid: torch.Tensor) -> int:
    """Model calls of one rollout on ``grid`` (one per step; no CFG)."""
    return int(grid.numel()) - 1
