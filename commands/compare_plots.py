"""The comparison's curves: held-out reward against iterations, wall-clock and NFE; and the signs of
reward hacking, the held-out diversity and drift from the base of every run beside its reward."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def style(i: int) -> dict[str, Any]:
    """The line style of the i-th run: matplotlib's ten colors, then the same colors dashed, dotted and
    dash-dotted with other markers, so that more than ten runs stay apart."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4], "marker": "os^D"[i // 10 % 4]}


SEED_SEPARATOR = " · "  # a run's label when its variant has several seeds: "<variant> · seed_<k>"


def run_styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """A line style per run label: the runs of one variant share its color and marker (``style``) and
    differ in line style, seed by seed."""
    variants = list(dict.fromkeys(label.split(SEED_SEPARATOR)[0] for label in labels))
    seen: dict[str, int] = {}
    looks = {}
    for label in labels:
        variant = label.split(SEED_SEPARATOR)[0]
        k = seen[variant] = seen.get(variant, -1) + 1
        look = style(variants.index(variant))
        looks[label] = {**look, "linestyle": ("-", "--", ":", "-.")[k % 4]} if k else look
    return looks


def plot_curves(table: dict[str, dict], metric: str, path: Path) -> None:
    """Reward against iterations, wall-clock and NFE. One seed: its curve ± the evaluation SE.
    Several: the mean over seeds, a band of ± SE over seeds, and each seed as a thin line."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    several = False
    for i, (label, row) in enumerate(table.items()):
        curves = [c for c in row["curves"] if c]
        if not curves:
            continue
        look = style(i)
        color = look["color"]
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
                    ax.plot([p[x] for p in c[:n]], [p[1] for p in c[:n]], color=color, linestyle=look["linestyle"],
                            lw=0.7, alpha=0.45)
        else:
            ys, es = [p[0][1] for p in columns], [p[0][2] for p in columns]
        for ax, xs in zip(axes, (xs_iter, xs_wall, xs_nfe)):
            ax.plot(xs, ys, ms=3, **look, label=f"{label} ({len(curves)} seeds)" if len(curves) > 1 else label)
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


HACKING_FIGURE = "hacking_curves.png"


def untrained_rewards(rows: list[dict[str, Any]]) -> list[str]:
    """The rewards a run evaluated on held-out prompts but never trained on (``eval/<name>/mean`` without
    ``reward/<name>/mean``): where reward hacking shows first."""
    from mixgrpo.core import metrics

    keys = {k for r in rows for k in r}
    names = sorted({k.split("/")[1] for k in keys if k.startswith("eval/") and k.endswith("/mean")})
    return [n for n in names if metrics.evaluation(n, "mean") in keys and metrics.reward(n, "mean") not in keys
            and n not in ("diversity", "kl_base")]


def plot_measures(curves: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Per run (``{label: metrics rows}``), against iterations, one panel each: every held-out reward the
    runs were not trained on (± SE), the held-out diversity (± SE) and the drift from the base; False
    when no run recorded any."""
    from mixgrpo.commands.report import MEASURES
    from mixgrpo.core import metrics

    untrained = sorted({n for rows in curves.values() for n in untrained_rewards(rows)})
    measures = [(f"{n} (not trained)", metrics.evaluation(n, "mean"), metrics.evaluation(n, "sem")) for n in untrained]
    panels = [(label, mean, sem) for label, mean, sem in (*measures, *MEASURES)
              if any(mean in r for rows in curves.values() for r in rows)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    looks = run_styles(list(curves))
    for ax, (ylabel, mean_key, sem_key) in zip(axes[0], panels):
        for label, rows in curves.items():
            points = [(r["iteration"], r[mean_key], (r.get(sem_key) if sem_key else 0.0) or 0.0) for r in rows
                      if isinstance(r.get(mean_key), (int, float)) and math.isfinite(r[mean_key])]
            if points:
                xs, ys, es = zip(*points)
                ax.errorbar(xs, ys, yerr=es, ms=3, capsize=2, **looks[label], label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"held-out {ylabel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def hacking_section(runs: dict[str, list[Path]], out: Path) -> list[str]:
    """The report's "Reward hacking" section: for every run, each sign of reward hacking in words
    (``hacking.hacking_signals``: a trained reward rose while a held-out reward or the diversity fell
    by more than its SE, base → latest evaluation), or that there is none; and the figure of the
    held-out rewards it was not trained on, diversity and drift from the base of every run
    (``out/hacking_curves.png``)."""
    from mixgrpo.commands.compare_report import _dedupe, _read_jsonl  # a cut line (a killed run) reads as nothing
    from mixgrpo.commands.report import run_signals

    curves = {(label if len(dirs) == 1 else f"{label}{SEED_SEPARATOR}{d.name}"):
              _dedupe(_read_jsonl(d / "metrics.jsonl"))
              for label, dirs in runs.items() for d in dirs if (d / "metrics.jsonl").is_file()}
    signals = {label: run_signals(rows) for label, rows in curves.items()}
    lines = ["", "## Reward hacking", "",
             "A run shows a sign of reward hacking when, between the base and the latest evaluation, a trained "
             "reward rose while a held-out reward it was not trained on, or the within-prompt diversity of its "
             "images, fell by more than the standard error of that change.", ""]
    for label, found in signals.items():
        lines += [f"- **{label}**: possible reward hacking: {s}" for s in found] or [f"- **{label}**: no sign"]
    if plot_measures(curves, out / HACKING_FIGURE):
        lines += ["", f"![held-out rewards not trained on, diversity and drift from the base]({HACKING_FIGURE})"]
    return lines
