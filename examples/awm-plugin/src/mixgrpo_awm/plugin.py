"""AWM (Xue et al., arXiv 2509.25050) written against mixgrpo's public API only.

This package shows that a forward-process method needs nothing from mixgrpo's source tree: it
subclasses ``mixgrpo.MatchingObjective`` (advantages, the σ draws, a loss of velocities) and
registers under the entry-point group ``mixgrpo``; the trainer then rolls out with the ODE only,
re-noises the final samples and calls ``loss``. mixgrpo also ships AWM in-tree (objective ``awm``,
with all of its weightings); this one is the uniform-weighted form, deliberately self-contained:
``example.awm`` in gin, ``ExampleAWM.num_timesteps = 4`` to configure it.
"""

from __future__ import annotations

import torch

from mixgrpo import MatchingObjective, hookimpl


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


class ExampleAWM(MatchingObjective):
    """Per-group z-scored advantages; K σ values drawn uniformly from the grid's first
    ``⌊fraction·T⌋`` steps; loss ``max(−A·ρ, −A·clip(ρ, 1 ± ε))`` with ``ρ = exp(ℓ_θ − ℓ_old)`` and
    ``ℓ = −mean((v − (ε − x0))²)``.

    Args:
        weights: ``{reward name: weight}`` (the trainer passes ``TrainConfig.rewards``).
        num_timesteps: K, σ draws per sample and iteration.
        fraction: the share of the grid (from σ = 1) the draws come from, in (0, 1].
        clip_range: the ratio clip ε.
        adv_clip: advantages are clamped to ±adv_clip.
    """

    def __init__(self, weights=None, num_timesteps: int = 4, fraction: float = 0.9, clip_range: float = 1.0,
                 adv_clip: float = 5.0) -> None:
        if num_timesteps < 1 or not 0 < fraction <= 1 or clip_range <= 0 or adv_clip <= 0:
            raise ValueError("num_timesteps >= 1, 0 < fraction <= 1, clip_range > 0 and adv_clip > 0 are required")
        self.weights, self.num_timesteps, self.fraction = weights, num_timesteps, fraction
        self.clip_range, self.adv_clip = clip_range, adv_clip

    def advantages(self, rewards, group_ids):
        names = list(rewards)
        weights = self.weights or dict.fromkeys(names, 1.0)
        total = sum(weights.get(n, 0.0) for n in names) or 1.0
        combined = sum(rewards[n].float() * weights.get(n, 0.0) for n in names) / total
        adv = torch.zeros_like(combined)
        for g in group_ids.unique():
            rows = group_ids == g
            adv[rows] = (combined[rows] - combined[rows].mean()) / (combined[rows].std(unbiased=False) + 1e-4)
        return adv.clamp(-self.adv_clip, self.adv_clip)

    def draw_sigmas(self, grid, n, generator):
        steps = max(1, int(self.fraction * (grid.numel() - 1)))
        picks = torch.randint(0, steps, (self.num_timesteps,), generator=generator)
        return grid[picks].float().unsqueeze(1).expand(-1, n).clone()

    def loss(self, v_new, v_old, x0, noise, sigma, advantages, v_ref=None):
        target = noise - x0
        log_ratio = _mean((v_old - target) ** 2) - _mean((v_new - target) ** 2)
        ratio = log_ratio.exp()
        adv = advantages.clamp(-self.adv_clip, self.adv_clip)
        policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range))
        stats = {"ratio": ratio.detach(), "approx_kl": 0.5 * log_ratio.detach() ** 2,
                 "clipped": ((ratio - 1).abs() > self.clip_range).float().detach(), "policy": policy.detach(),
                 "kl": torch.zeros_like(policy)}
        return policy, stats


@hookimpl
def register_objectives(register):
    register("example.awm", ExampleAWM)
