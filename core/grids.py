"""Sample grids: images with their prompts and scores as one captioned PNG (matplotlib, Agg),
written during training (iteration 0, every ``sample_every``, the end) and by the reports."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mixgrpo.core.metrics import format_value  # noqa: E402


def save_sample_grid(images: torch.Tensor, captions: Sequence[str], path: Path, columns: int = 4,
                     title: str | None = None) -> Path:
    """Write images ``[N, 3, H, W]`` in [0, 1] as a captioned PNG grid (atomically), under ``title``."""
    n = images.shape[0]
    rows = max(1, math.ceil(n / columns))
    wrapped = ["\n".join(w for part in c.split("\n") for w in textwrap.wrap(part, 24) or [""]) for c in captions]
    lines = max((w.count("\n") + 1 for w in wrapped), default=1)
    height = (2.1 + 0.13 * lines) * rows + (0.4 if title else 0)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, height), squeeze=False)
    if title:
        fig.suptitle(title, fontsize=10)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_title(wrapped[k], fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def scored_captions(rewards: Mapping[str, Any], images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
    """Captions for a sample grid: each prompt with its image's score under every reward
    (``n/a`` where the reward failed)."""
    from mixgrpo.core.scoring import call_reward

    scores = {name: call_reward(reward, name, images, prompts) for name, reward in rewards.items()}
    return [prompt + "\n" + " ".join(f"{name.split('.')[-1]} {format_value(float(s[k]))}" for name, s in scores.items())
            for k, prompt in enumerate(prompts)]
