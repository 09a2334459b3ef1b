"""NFE per sample that the method presets predict (experiments/methods/*.gin), written out by hand
from the presets' numbers: window w = 4 at step 0 for the first iterations (progressive windows
move every 20-25 iterations, Flash* is frozen at 0), Flash's post-window points
n = max(int((T - L)·r), 2) after the window's last step L = 3."""

import math

WINDOW = 4
METHODS = ("flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star")


def rollout_steps(method: str, T: int) -> int:
    ratio = {"mixgrpo_flash": 0.4, "mixgrpo_flash_star": 0.2}.get(method)
    if ratio is None:
        return T
    last = WINDOW - 1
    n_post = max(int((T - last) * ratio), 2)
    compressed = last + n_post  # σ_0 … σ_{L+1}, then n_post − 1 more points
    return compressed if compressed < T else T


def trained_steps(method: str, T: int) -> int:
    if method == "flowgrpo":  # every step but the last (train_fraction 0.99)
        return min(math.floor(0.99 * T + 1e-9), T - 1)
    if method == "dancegrpo":  # a random 60% of steps 0..T-2 per sample
        return math.floor(0.6 * (T - 1) + 1e-9)
    return WINDOW
