"""NFE per sample that the method presets predict (experiments/methods/*.gin), written out by hand
from the presets' numbers: windows of w = 4 steps; MixGRPO's window starts at min(k // 25, T − w) at
iteration k, Flash's at min(k // 20, T − w), Flash*'s at 0; Flash compresses the steps after the
window's last step L to n = max(int((T − L)·r), 2) grid points (r = 0.4, Flash* 0.2)."""

import math

WINDOW = 4
METHODS = ("flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star")


def window_start(method: str, T: int, iteration: int) -> int:
    every = {"mixgrpo": 25, "mixgrpo_flash": 20}.get(method)
    return min(iteration // every, T - WINDOW) if every else 0


def rollout_steps(method: str, T: int, iteration: int = 0) -> int:
    ratio = {"mixgrpo_flash": 0.4, "mixgrpo_flash_star": 0.2}.get(method)
    if ratio is None:
        return T
    last = window_start(method, T, iteration) + WINDOW - 1
    n_post = max(int((T - last) * ratio), 2)
    compressed = last + n_post  # σ_0 … σ_{L+1}, then n_post − 1 more points
    return compressed if compressed < T else T


def trained_steps(method: str, T: int) -> int:
    if method == "flowgrpo":  # every step but the last (train_fraction 0.99)
        return min(math.floor(0.99 * T + 1e-9), T - 1)
    if method == "dancegrpo":  # a random 60% of steps 0..T-2 per sample
        return math.floor(0.6 * (T - 1) + 1e-9)
    return WINDOW
