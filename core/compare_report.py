"""The comparison report: a results table, reward curves (PNG) and a sample grid per variant."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import json  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402

from mixgrpo.core import metrics  # noqa: E402
from mixgrpo.core.report import EVAL_SCORES, read_metrics, slug  # noqa: E402


def _combine(means: list[float], sems: list[float]) -> tuple[float, float]:
    """Mean of k run means and its standard error, treating runs as independent."""
    k = len(means)
    if not k:
        return float("nan"), float("nan")
    return sum(means) / k, math.sqrt(sum(s * s for s in sems)) / k


def _curve(rows: list[dict], key: str) -> list[tuple[int, float, float, float, float]]:
    """(iteration, mean, sem, wall-clock s, cumulative NFE per sample) at every evaluation."""
    out, wall, nfe = [], 0.0, 0.0
    mean_key, sem_key = metrics.evaluation(key, "mean"), metrics.evaluation(key, "sem")
    for row in rows:
        wall += row.get(metrics.ITERATION_S) or 0.0
        nfe += (row.get(metrics.NFE_ROLLOUT) or 0.0) + (row.get(metrics.NFE_TRAIN) or 0.0)
        if row.get(mean_key) is not None:
            out.append((row[metrics.ITERATION], row[mean_key], row.get(sem_key) or 0.0, wall, nfe))
    return out


def paired_gain(run_dir: Path, key: str) -> tuple[float, float, int] | None:
    """Final minus base held-out reward of one run, image by image (the same prompts and seeds at
    every evaluation): (mean difference, its standard error, images), or None without per-image
    scores. Pairing removes the prompt-to-prompt spread that both evaluations share, so this SE is
    the one that says whether training changed the model."""
    path = run_dir / EVAL_SCORES
    if not path.is_file():
        return None
    by_iter: dict[int, list[float]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if key in row:
                    by_iter[int(row["iteration"])] = row[key]  # a resumed run's repeat wins
    if 0 not in by_iter or len(by_iter) < 2:
        return None
    base, final = by_iter[0], by_iter[max(by_iter)]
    if len(base) != len(final):
        return None
    diffs = [b - a for a, b in zip(base, final) if math.isfinite(a) and math.isfinite(b)]
    n = len(diffs)
    if n < 2:
        return None
    m = sum(diffs) / n
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    return m, sd / math.sqrt(n), n


def _pick_metric(rows: list[dict]) -> str:
    names = metrics.evaluated_rewards(rows)
    if names:
        return names[0]
    raise ValueError("no evaluation rows in metrics.jsonl: set TrainConfig.eval_every > 0 for comparisons")


def summarize(runs: dict[str, list[Path]], metric: str | None = None) -> tuple[str, dict[str, dict]]:
    """Per variant: base/final held-out reward (± SE over prompts and seeds), timings and NFE."""
    table: dict[str, dict] = {}
    for label, dirs in runs.items():
        per_seed = [read_metrics(d / "metrics.jsonl") for d in dirs if (d / "metrics.jsonl").is_file()]
        if not per_seed:
            continue
        metric = metric or _pick_metric(per_seed[0])
        curves = [_curve(rows, metric) for rows in per_seed]
        iters = [r for rows in per_seed for r in rows if metrics.ITERATION_S in r]
        base = _combine([c[0][1] for c in curves], [c[0][2] for c in curves])
        final = _combine([c[-1][1] for c in curves], [c[-1][2] for c in curves])
        paired = [paired_gain(d, metric) for d in dirs if (d / "metrics.jsonl").is_file()]
        paired_ok = [p for p in paired if p is not None]
        paired_gain_ = (_combine([p[0] for p in paired_ok], [p[1] for p in paired_ok])
                        if paired_ok and len(paired_ok) == len(paired) else None)
        table[label] = {
            "curves": curves,
            "base": base,
            "final": final,
            "gain": (final[0] - base[0], math.hypot(final[1], base[1])),
            "paired_gain": paired_gain_,
            "iteration_s": mean(r[metrics.ITERATION_S] for r in iters),
            "rollout_s": mean(r[metrics.ROLLOUT_S] for r in iters),
            "train_s": mean(r[metrics.TRAIN_S] for r in iters),
            "nfe_rollout": mean(r[metrics.NFE_ROLLOUT] for r in iters),
            "nfe_train": mean(r[metrics.NFE_TRAIN] for r in iters),
            "wall_s": mean(sum(r.get(metrics.ITERATION_S, 0.0) for r in rows) for rows in per_seed),
            "seeds": len(per_seed),
            "iterations": max(r[metrics.ITERATION] for r in iters),
        }
    return metric or "", table


def predicted_ratios(table: dict[str, dict], reference: str) -> dict[str, tuple[float, float]]:
    """(predicted, measured) iteration-time ratio of each variant to ``reference``.

    The prediction is NFE accounting: the reference's measured seconds per rollout call and per
    training call (forward + backward) priced at every variant's NFE counts. Reward time is the
    same for every variant and is added as measured on the reference.
    """
    ref = table[reference]
    per_rollout = ref["rollout_s"] / max(ref["nfe_rollout"], 1e-9)
    per_train = ref["train_s"] / max(ref["nfe_train"], 1e-9)
    other = ref["iteration_s"] - ref["rollout_s"] - ref["train_s"]
    out = {}
    for label, row in table.items():
        predicted = row["nfe_rollout"] * per_rollout + row["nfe_train"] * per_train + other
        out[label] = (predicted / ref["iteration_s"], row["iteration_s"] / ref["iteration_s"])
    return out


def _plot(table: dict[str, dict], metric: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, row in table.items():
        curves = row["curves"]
        n = min(len(c) for c in curves)
        xs_iter = [curves[0][k][0] for k in range(n)]
        xs_wall = [mean(c[k][3] for c in curves) for k in range(n)]
        xs_nfe = [mean(c[k][4] for c in curves) for k in range(n)]
        ys, es = zip(*[_combine([c[k][1] for c in curves], [c[k][2] for c in curves]) for k in range(n)])
        for ax, xs in zip(axes, (xs_iter, xs_wall, xs_nfe)):
            ax.plot(xs, ys, marker="o", ms=3, label=label)
            ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)], alpha=0.15)
    for ax, xlabel in zip(axes, ("iteration", "training wall-clock (s)", "model calls per sample (cumulative)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"held-out {metric} (mean ± SE over evaluation prompts and seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, runs: dict[str, list[Path]], metric: str | None = None,
                 side_by_side: dict | None = None) -> Path:
    """``out/report.md``; ``side_by_side`` (``side_by_side.compare_runs_side_by_side``'s result, its
    files in ``out/side_by_side/``) puts a grid per prompt right under the results table."""
    out.mkdir(parents=True, exist_ok=True)
    metric, table = summarize(runs, metric)
    if not table:
        raise ValueError(f"no finished runs under {out}")
    _plot(table, metric, out / "reward_curves.png")
    reference = next((k for k in table if "dance" in k.lower()), next(iter(table)))
    ratios = predicted_ratios(table, reference)
    lines = [
        "# Comparison report", "",
        f"Held-out reward: `{metric}` on evaluation prompts never trained on, deterministic ODE sampling at "
        f"fixed seeds; ± is the standard error over evaluation prompts × sampling seeds (pooled over "
        f"{next(iter(table.values()))['seeds']} training seed(s)). Timings are means over all iterations of all "
        "seeds on this machine.", "",
        "| variant | base | final | gain | s / iteration | rollout s | train s | NFE rollout | NFE train "
        "| wall-clock s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in table.items():
        lines.append(
            f"| {label} | {r['base'][0]:.4f} ± {r['base'][1]:.4f} | {r['final'][0]:.4f} ± {r['final'][1]:.4f} | "
            f"{r['gain'][0]:+.4f} | {r['iteration_s']:.2f} | {r['rollout_s']:.2f} | "
            f"{r['train_s']:.2f} | {r['nfe_rollout']:.1f} | {r['nfe_train']:.1f} | {r['wall_s']:.0f} |"
        )
    if side_by_side is not None:
        from mixgrpo.core.side_by_side import grid_section

        lines += ["", "## Side by side", "",
                  "Rows: the base model and each variant's final checkpoint (its first training seed); columns: "
                  "sampling seeds, the same noise in every row; under each image its scores.", "",
                  *grid_section(side_by_side, "side_by_side")]
    lines += ["", "## Did training change the held-out reward?", "",
              "Gain = final − base. *Against the curves' SE*: the gain in units of the final evaluation's standard "
              "error (over prompts and seeds, as in the table); above 2 means the final mean lies more than two of "
              "those SEs above the base. *Paired*: the per-image difference between the final and base evaluations "
              "(the same prompts and seeds), mean ± its SE: it removes the prompt-to-prompt spread both "
              "evaluations share, so it is smaller than the curve's SE when training changes images a little, and "
              "about equal when it redraws them.", "",
              "| variant | gain | gain / SE of the curve | paired gain ± SE | paired z |", "|---|---|---|---|---|"]
    for label, r in table.items():
        g, se = r["gain"][0], r["final"][1]
        pg = r["paired_gain"]
        paired = f"{pg[0]:+.4f} ± {pg[1]:.4f} | {pg[0] / pg[1]:+.1f}" if pg and pg[1] > 0 else "n/a | n/a"
        lines.append(f"| {label} | {g:+.4f} | {g / se:+.1f} | {paired} |" if se > 0 else
                     f"| {label} | {g:+.4f} | n/a | {paired} |")
    lines += ["", f"## Iteration time against NFE accounting (relative to {reference})", "",
              "Predicted: the reference's measured cost of one rollout call and one training call, priced at each "
              "variant's NFE. Measured: the ratio of mean iteration times.", "",
              "| variant | predicted ratio | measured ratio |", "|---|---|---|"]
    lines += [f"| {label} | {p:.2f} | {m:.2f} |" for label, (p, m) in ratios.items()]
    lines += ["", "## Reward curves", "", "![held-out reward](reward_curves.png)", "", "## Samples (final)", ""]
    for label, dirs in runs.items():
        grids = sorted((dirs[0] / "samples").glob("iter_*.png")) if dirs else []
        if grids:
            name = f"samples_{slug(label)}.png"
            shutil.copyfile(grids[-1], out / name)
            first = f"samples_{slug(label)}_base.png"
            shutil.copyfile(grids[0], out / first)
            lines += [f"**{label}**: before / after", "", f"![{label} base]({first}) ![{label}]({name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
