"""The comparison report: a results table, reward curves (PNG) and a sample grid per variant, and the
same numbers in ``results.json``.

With one training seed per variant, a variant's row gives its base and final held-out reward ± the
standard error over evaluation prompts × sampling seeds. With several, that row pools the seeds
(the mean of the seeds' means ± their pooled evaluation SE), a row per seed follows it, and the gain
gets its spread between training seeds beside it: the mean of the per-seed gains ± the standard
deviation of those gains / √k (the SE over seeds, which the evaluation SE does not include). The
curves then show the mean over seeds, a band of ± SE over seeds and each seed as a thin line.

Every number is printed at the precision its standard error supports (``format_estimate``), never
as ``0.0000``; a run without records or without evaluations shows ``n/a``, never an error.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import matplotlib

matplotlib.use("Agg")
import json  # noqa: E402

from mixgrpo.commands.compare_plots import hacking_section, plot_curves  # noqa: E402
from mixgrpo.commands.report import EVAL_SCORES, samples_per_iteration, slug  # noqa: E402
from mixgrpo.core import metrics  # noqa: E402
from mixgrpo.core.records import ITERATION_GLOB  # noqa: E402

RESULTS = "results.json"
TIMINGS = (("iteration_s", metrics.ITERATION_S), ("rollout_s", metrics.ROLLOUT_S), ("train_s", metrics.TRAIN_S),
           ("nfe_rollout", metrics.NFE_ROLLOUT), ("nfe_train", metrics.NFE_TRAIN))


# -- numbers as text ------------------------------------------------------------------------------

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _texts(value: float | None, sem: float | None) -> tuple[str, str | None]:
    """(value, SE) as text at the precision of the SE: the SE to two significant digits and the value
    to the same decimal place; an SE under 0.001 in significant digits (``2.30e-05``, ``1.1e-06``),
    the value down to the SE's second digit. Without an SE, the value to 4 significant digits."""
    if not _finite(value):
        return "n/a", None
    if not _finite(sem) or sem <= 0:
        return f"{value:.4g}", None
    decimals = 1 - math.floor(math.log10(sem))
    if decimals <= 4:
        decimals = max(0, decimals)
        return f"{value:.{decimals}f}", f"{sem:.{decimals}f}"
    digits = 2 if value == 0 else math.floor(math.log10(abs(value))) - math.floor(math.log10(sem)) + 2
    return f"{value:#.{min(max(digits, 2), 9)}g}", f"{sem:#.2g}"


def _signed(text: str) -> str:
    return text if text.startswith(("-", "n/a")) else "+" + text


def format_estimate(value: float | None, sem: float | None, signed: bool = False) -> str:
    """``mean ± SE`` at the precision the SE supports (``0.4410 ± 0.0080``, ``2.30e-05 ± 1.1e-06``);
    ``signed`` puts a ``+`` before a positive value; ``n/a`` for a missing value."""
    text, se = _texts(value, sem)
    text = _signed(text) if signed else text
    return text if se is None else f"{text} ± {se}"


def format_at(value: float | None, sem: float | None, signed: bool = False) -> str:
    """The value alone, at the precision of ``sem`` (a gain beside a column of estimates)."""
    text = _texts(value, sem)[0]
    return _signed(text) if signed else text


# -- reading the runs -----------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a line cut short (a killed run) or a file that is not there reads
    as nothing."""
    if not path.is_file():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _combine(means: list[float], sems: list[float]) -> tuple[float, float]:
    """Mean of k run means and its standard error, treating runs as independent."""
    k = len(means)
    if not k:
        return float("nan"), float("nan")
    return sum(means) / k, math.sqrt(sum(s * s for s in sems)) / k


def _over_seeds(values: list[float]) -> tuple[float, float, int] | None:
    """Mean of per-seed values ± the SE over seeds (their standard deviation / √k), with k ≥ 2."""
    values = [v for v in values if _finite(v)]
    if len(values) < 2:
        return None
    return mean(values), stdev(values) / math.sqrt(len(values)), len(values)


def _curve(rows: list[dict], key: str) -> list[tuple[int, float, float, float, float]]:
    """(iteration, mean, sem, wall-clock s, cumulative NFE per sample) at every evaluation."""
    out, wall, nfe = [], 0.0, 0.0
    mean_key, sem_key = metrics.evaluation(key, "mean"), metrics.evaluation(key, "sem")
    for row in rows:
        wall += row.get(metrics.ITERATION_S) or 0.0
        nfe += (row.get(metrics.NFE_ROLLOUT) or 0.0) + (row.get(metrics.NFE_TRAIN) or 0.0)
        if _finite(row.get(mean_key)) and metrics.ITERATION in row:
            sem = row.get(sem_key)
            out.append((row[metrics.ITERATION], row[mean_key], sem if _finite(sem) else 0.0, wall, nfe))
    return out


def paired_gain(run_dir: Path, key: str) -> tuple[float, float, int] | None:
    """Final minus base held-out reward of one run, image by image (the same prompts and seeds at
    every evaluation): (mean difference, its standard error, images), or None without per-image
    scores. Pairing removes the prompt-to-prompt spread that both evaluations share, so this SE is
    the one that says whether training changed the model."""
    by_iter: dict[int, list[float]] = {}
    for row in _read_jsonl(run_dir / EVAL_SCORES):
        if isinstance(row.get(key), list) and "iteration" in row:
            by_iter[int(row["iteration"])] = row[key]  # a resumed run's repeat wins
    if 0 not in by_iter or len(by_iter) < 2:
        return None
    base, final = by_iter[0], by_iter[max(by_iter)]
    if len(base) != len(final):
        return None
    diffs = [b - a for a, b in zip(base, final) if _finite(a) and _finite(b)]
    n = len(diffs)
    if n < 2:
        return None
    m = sum(diffs) / n
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    return m, sd / math.sqrt(n), n


def _run_seed(run_dir: Path, index: int) -> int:
    found = re.fullmatch(r"seed_(-?\d+)", run_dir.name)
    return int(found.group(1)) if found else index


def _summarize_run(run_dir: Path, rows: list[dict], metric: str, index: int) -> dict[str, Any]:
    """One (variant, seed) run: its curve, base and final evaluation, gain, paired gain and timings."""
    curve = _curve(rows, metric) if metric else []
    iters = [r for r in rows if _finite(r.get(metrics.ITERATION_S))]
    out: dict[str, Any] = {
        "seed": _run_seed(run_dir, index),
        "run": str(run_dir),
        "records": bool(rows),
        "evaluations": len(curve),
        "curve": curve,
        "base": (curve[0][1], curve[0][2]) if curve else None,
        "final": (curve[-1][1], curve[-1][2]) if curve else None,
        "gain": curve[-1][1] - curve[0][1] if curve else None,
        "paired_gain": paired_gain(run_dir, metric) if curve else None,
        "wall_s": sum(r[metrics.ITERATION_S] for r in iters) if iters else None,
        "iterations": max((r.get(metrics.ITERATION, 0) for r in iters), default=None),
    }
    for name, key in TIMINGS:
        values = [r[key] for r in iters if _finite(r.get(key))]
        out[name] = mean(values) if values else None
    return out


def summarize(runs: dict[str, list[Path]], metric: str | None = None) -> tuple[str, dict[str, dict]]:
    """Per variant: base/final held-out reward (± SE over prompts and seeds, pooled over training
    seeds), gain, paired gain, the gain's spread over training seeds (``seed_gain``: mean ± SE over
    seeds, with two or more seeds), timings and NFE, and ``per_seed``: the same for each run.

    A variant none of whose runs has records is left out; a run without records or evaluations gives
    ``None`` where its numbers would be. ``metric`` defaults to the first reward any run evaluated."""
    rows = {label: [_dedupe(_read_jsonl(d / "metrics.jsonl")) for d in dirs] for label, dirs in runs.items()}
    if not metric:
        metric = next((names[0] for per_seed in rows.values() for r in per_seed
                       if (names := metrics.evaluated_rewards(r))), "")
    table: dict[str, dict] = {}
    for label, dirs in runs.items():
        if not any(rows[label]):
            continue
        per_seed = [_summarize_run(d, r, metric, i) for i, (d, r) in enumerate(zip(dirs, rows[label]))]
        evaluated = [s for s in per_seed if s["evaluations"]]
        base = _combine([s["base"][0] for s in evaluated], [s["base"][1] for s in evaluated]) if evaluated else None
        final = _combine([s["final"][0] for s in evaluated], [s["final"][1] for s in evaluated]) if evaluated else None
        paired = [s["paired_gain"] for s in evaluated]
        iters = [r for run_rows in rows[label] for r in run_rows if _finite(r.get(metrics.ITERATION_S))]
        entry: dict[str, Any] = {
            "per_seed": per_seed,
            "curves": [s["curve"] for s in evaluated],
            "base": base,
            "final": final,
            "gain": (final[0] - base[0], math.hypot(final[1], base[1])) if evaluated else None,
            "paired_gain": (_combine([p[0] for p in paired], [p[1] for p in paired])
                            if paired and all(p is not None for p in paired) else None),
            "seed_gain": _over_seeds([s["gain"] for s in evaluated]),
            "wall_s": mean(s["wall_s"] for s in per_seed if s["wall_s"] is not None) if iters else None,
            "seeds": sum(1 for s in per_seed if s["records"]),
            "iterations": max((s["iterations"] for s in per_seed if s["iterations"] is not None), default=None),
            "samples": samples_per_iteration(dirs[0]),  # per iteration: the NFE columns are per sample
        }
        for name, key in TIMINGS:
            values = [r[key] for r in iters if _finite(r.get(key))]
            entry[name] = mean(values) if values else None
        table[label] = entry
    return metric, table


def _dedupe(rows: list[dict]) -> list[dict]:
    """One row per iteration (the last written), in order: a resumed run's repeat wins."""
    by_iter: dict[Any, dict] = {}
    for row in rows:
        by_iter[row.get(metrics.ITERATION)] = row
    return sorted(by_iter.values(), key=lambda r: r.get(metrics.ITERATION) if _finite(r.get(metrics.ITERATION))
                  else -1)


def predicted_ratios(table: dict[str, dict], reference: str) -> dict[str, tuple[float, float]]:
    """(predicted, measured) iteration-time ratio of each variant to ``reference``.

    The prediction is NFE accounting: the reference's measured seconds per rollout call and per
    training call (forward + backward) priced at every variant's model calls per iteration (NFE per
    sample × samples per iteration, where the runs record it). Reward time is added as measured on
    the reference. Variants without timings (no training rows) are left out; so is everything when
    the reference has none.
    """
    ref = table.get(reference)
    names = [name for name, _ in TIMINGS]
    if ref is None or any(ref[n] is None for n in names) or ref["iteration_s"] <= 0:
        return {}
    per_rollout = ref["rollout_s"] / max(ref["nfe_rollout"], 1e-9)
    per_train = ref["train_s"] / max(ref["nfe_train"], 1e-9)
    other = ref["iteration_s"] - ref["rollout_s"] - ref["train_s"]
    out = {}
    for label, row in table.items():
        if any(row[n] is None for n in names):
            continue
        scale = row["samples"] / ref["samples"] if row.get("samples") and ref.get("samples") else 1.0
        predicted = (row["nfe_rollout"] * per_rollout + row["nfe_train"] * per_train) * scale + other
        out[label] = (predicted / ref["iteration_s"], row["iteration_s"] / ref["iteration_s"])
    return out


# -- report.md and results.json -------------------------------------------------------------------

def _number(value: float | None, spec: str) -> str:
    return f"{value:{spec}}" if _finite(value) else "n/a"


def _timing_cells(r: dict) -> str:
    return (f"{_number(r['iteration_s'], '.2f')} | {_number(r['rollout_s'], '.2f')} | {_number(r['train_s'], '.2f')} | "
            f"{_number(r['nfe_rollout'], '.1f')} | {_number(r['nfe_train'], '.1f')} | {_number(r['wall_s'], '.0f')}")


def _estimate_cells(r: dict) -> tuple[str, str, str]:
    base, final = r["base"] or (None, None), r["final"] or (None, None)
    gain = r["gain"][0] if isinstance(r["gain"], tuple) else r["gain"]
    return format_estimate(*base), format_estimate(*final), format_at(gain, final[1], signed=True)


def _seed_gain_cell(r: dict) -> str:
    sg = r["seed_gain"]
    return f"{format_estimate(sg[0], sg[1], signed=True)} ({sg[2]} seeds)" if sg else "n/a"


def _z(value: float | None, sem: float | None) -> str:
    return f"{value / sem:+.1f}" if _finite(value) and _finite(sem) and sem > 0 else "n/a"


def _paired_cells(pg: tuple | None) -> str:
    return f"{format_estimate(pg[0], pg[1], signed=True)} | {_z(pg[0], pg[1])}" if pg else "n/a | n/a"


def _seed_label(label: str, s: dict) -> str:
    return f"{label} · seed {s['seed']}"


def results_table(table: dict[str, dict]) -> list[str]:
    """The results table: a row per variant and, with several training seeds, a row per seed after
    it and a column with the gain ± SE over seeds."""
    several = any(len(r["per_seed"]) > 1 for r in table.values())
    spread = " gain ± SE over seeds |" if several else ""
    lines = [f"| variant | base | final | gain |{spread} s / iteration | rollout s | train s | NFE rollout | "
             "NFE train | wall-clock s |",
             "|---|---|---|---|" + ("---|" if several else "") + "---|---|---|---|---|---|"]
    for label, r in table.items():
        base, final, gain = _estimate_cells(r)
        lines.append(f"| {label} | {base} | {final} | {gain} |" + (f" {_seed_gain_cell(r)} |" if several else "")
                     + f" {_timing_cells(r)} |")
        if len(r["per_seed"]) > 1:
            for s in r["per_seed"]:
                base, final, gain = _estimate_cells(s)
                if not s["records"]:
                    base = final = gain = "no records"
                lines.append(f"| {_seed_label(label, s)} | {base} | {final} | {gain} | |" + f" {_timing_cells(s)} |")
    return lines


def gain_table(table: dict[str, dict]) -> list[str]:
    """Gain against the curve's SE and the paired per-image SE, and with several training seeds the
    gain ± SE over seeds and a row per seed."""
    several = any(len(r["per_seed"]) > 1 for r in table.values())
    lines = ["| variant | gain | gain / SE of the curve | paired gain ± SE | paired z |"
             + (" gain ± SE over seeds | z over seeds |" if several else ""),
             "|---|---|---|---|---|" + ("---|---|" if several else "")]
    for label, r in table.items():
        gain = r["gain"][0] if r["gain"] else None
        se = r["final"][1] if r["final"] else None
        cells = f"| {label} | {format_at(gain, se, signed=True)} | {_z(gain, se)} | {_paired_cells(r['paired_gain'])} |"
        if several:
            sg = r["seed_gain"]
            cells += f" {_seed_gain_cell(r)} | {_z(sg[0], sg[1]) if sg else 'n/a'} |"
        lines.append(cells)
        if len(r["per_seed"]) > 1:
            for s in r["per_seed"]:
                se = s["final"][1] if s["final"] else None
                lines.append(f"| {_seed_label(label, s)} | {format_at(s['gain'], se, signed=True)} | "
                             f"{_z(s['gain'], se)} | {_paired_cells(s['paired_gain'])} | | |")
    return lines


def _json_value(value: Any) -> Any:
    """NaN and infinities as null; tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def _estimate_json(value: tuple | None, *names: str) -> dict | None:
    return dict(zip(names, _json_value(list(value)))) if value else None


def results_json(table: dict[str, dict], metric: str, out: Path) -> dict[str, Any]:
    """What ``results.json`` holds: per variant its pooled numbers, the gain's spread over seeds and
    ``seeds``, a record per training seed (its run folder relative to ``out``)."""

    def numbers(r: dict) -> dict[str, Any]:
        gain = r["gain"]
        return {
            "base": _estimate_json(r["base"], "mean", "sem"),
            "final": _estimate_json(r["final"], "mean", "sem"),
            "gain": _json_value(gain[0] if isinstance(gain, tuple) else gain),
            "paired_gain": _estimate_json(r["paired_gain"], "mean", "sem", "images"),
            **{name: _json_value(r[name]) for name, _ in TIMINGS},
            "wall_s": _json_value(r["wall_s"]),
            "iterations": r["iterations"],
        }

    def relative(path: str) -> str:
        try:
            return str(Path(path).relative_to(out))
        except ValueError:
            return path

    return {
        "metric": metric,
        "variants": {label: {
            **numbers(r),
            "gain_over_seeds": _estimate_json(r["seed_gain"], "mean", "sem", "seeds"),
            "seeds": [{"seed": s["seed"], "run": relative(s["run"]), "records": s["records"],
                       "evaluations": s["evaluations"], **numbers(s)} for s in r["per_seed"]],
        } for label, r in table.items()},
    }


def write_report(out: Path, runs: dict[str, list[Path]], metric: str | None = None,
                 side_by_side: dict | None = None) -> Path:
    """``out/report.md`` and ``out/results.json``; ``side_by_side`` (``side_by_side.compare_runs_side_by_side``'s
    result, its files in ``out/side_by_side/``) puts a grid per prompt right under the results table."""
    out.mkdir(parents=True, exist_ok=True)
    metric, table = summarize(runs, metric)
    if not table:
        raise ValueError(f"no runs with records under {out}: nothing to report")
    plot_curves(table, metric, out / "reward_curves.png")
    (out / RESULTS).write_text(json.dumps(results_json(table, metric, out), indent=1) + "\n")
    timed = [k for k in table if table[k]["iteration_s"] is not None]
    reference = next((k for k in timed if "dance" in k.lower()), timed[0] if timed else next(iter(table)))
    ratios = predicted_ratios(table, reference)
    seeds = max(r["seeds"] for r in table.values())
    if seeds > 1:
        se_text = (f"± is the standard error over evaluation prompts × sampling seeds; a variant's row pools its "
                   f"{seeds} training seeds (mean of their means, pooled SE) and a row per seed follows it. *Gain ± "
                   "SE over seeds*: the mean of the per-seed gains ± their standard deviation / √k, the spread "
                   "between training seeds, which the evaluation SE does not include (with k = 2 it rests on "
                   "one degree of freedom: read it as rough).")
    else:
        se_text = ("± is the standard error over evaluation prompts × sampling seeds (pooled over "
                   f"{seeds} training seed(s)).")
    lines = [
        "# Comparison report", "",
        f"Held-out reward: `{metric or 'none'}` on evaluation prompts never trained on, deterministic ODE sampling "
        f"at fixed seeds; {se_text} Timings are means over all iterations of all seeds on this machine.", "",
        *results_table(table),
    ]
    if not metric or not any(r["curves"] for r in table.values()):
        lines += ["", "No run holds a held-out evaluation (`TrainConfig.eval_every = 0`): rewards are n/a."]
    if side_by_side is not None:
        from mixgrpo.commands.side_by_side import grid_section

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
              "about equal when it redraws them."
              + (" *Over seeds*: the per-seed gains' mean ± SE over training seeds, and that mean in units of "
                 "that SE." if seeds > 1 else ""), "",
              *gain_table(table)]
    if ratios:
        lines += ["", f"## Iteration time against NFE accounting (relative to {reference})", "",
                  "Predicted: the reference's measured cost of one rollout call and one training call, priced at "
                  "each variant's NFE. Measured: the ratio of mean iteration times.", "",
                  "| variant | predicted ratio | measured ratio |", "|---|---|---|"]
        lines += [f"| {label} | {p:.2f} | {m:.2f} |" for label, (p, m) in ratios.items()]
    lines += ["", "## Reward curves", "", "![held-out reward](reward_curves.png)", *hacking_section(runs, out)]
    lines += ["", "## Samples (final)", ""]
    for label, dirs in runs.items():
        grids = next((g for d in dirs if (g := sorted((d / "samples").glob(f"{ITERATION_GLOB}.png")))), [])
        if grids:
            name = f"samples_{slug(label)}.png"
            shutil.copyfile(grids[-1], out / name)
            first = f"samples_{slug(label)}_base.png"
            shutil.copyfile(grids[0], out / first)
            lines += [f"**{label}**: before / after", "", f"![{label} base]({first}) ![{label}]({name})", ""]
    lines += ["", f"The numbers of the tables, per variant and per training seed: `{RESULTS}`."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
