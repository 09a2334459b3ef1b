"""The comparison's reward curves: held-out reward against iterations, wall-clock and NFE."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, stdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(table: dict[str, dict], metric: str, path: Path) -> None:
    """Reward against iterations, wall-clock and NFE. One seed: its curve ± the evaluation SE.
    Several: the mean over seeds, a band of ± SE over seeds, and each seed as a thin line."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    several = False
    for i, (label, row) in enumerate(table.items()):
        curves = [c for c in row["curves"] if c]
        if not curves:
            continue
        color = f"C{i % 10}"
        n = min(len(c) for c in curves)
        columns = [[c[k] for c in curves] for k in range(n)]
        xs_iter = [points[0][0] for points in columns]
        xs_wall = [mean(p[3] for p in points) for points in columns]
        xs_nfe = [mean(p[4] for p in points) for points in columns]
        if len(curves) > 1:
            several = True
            ys = [mean(p[1] for p in points) for points in columns]
            es = [stdev(p[1] for p in points) / math.sqrt(len(points)) for points in columns]
            for c in curves:
                for ax, x in zip(axes, (0, 3, 4)):
                    ax.plot([p[x] for p in c[:n]], [p[1] for p in c[:n]], color=color, lw=0.7, alpha=0.45)
        else:
            ys, es = [p[0][1] for p in columns], [p[0][2] for p in columns]
        for ax, xs in zip(axes, (xs_iter, xs_wall, xs_nfe)):
            ax.plot(xs, ys, marker="o", ms=3, color=color, label=f"{label} ({len(curves)} seeds)" if len(curves) > 1
                    else label)
            ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)], color=color,
                            alpha=0.15)
    for ax, xlabel in zip(axes, ("iteration", "training wall-clock (s)", "model calls per sample (cumulative)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {metric}" if metric else "held-out reward")
        ax.grid(alpha=0.3)
    if any(row["curves"] for row in table.values()):
        axes[0].legend(fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no held-out evaluation", ha="center", va="center", transform=axes[0].transAxes)
    single = any(len(row["curves"]) == 1 for row in table.values())
    fig.suptitle(f"held-out {metric}: mean over training seeds, band ± SE over seeds, thin lines each seed"
                 + (" (one seed: ± SE over evaluation prompts and seeds)" if single else "") if several else
                 f"held-out {metric} (mean ± SE over evaluation prompts and seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
