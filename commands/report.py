"""Pictures people would rather look at than read: sample grids and reward curves (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")


#: per-image held-out scores of every evaluation of a run: one JSON line per evaluation,
#: ``{"iteration": k, "<reward name>": [score per image, ...]}``
from mixgrpo.core import hacking, metrics  # noqa: E402
from mixgrpo.core.grids import save_sample_grid, scored_captions  # noqa: E402,F401 (re-exported)
from mixgrpo.core.metrics import format_value  # noqa: E402,F401 (re-exported)
from mixgrpo.core.records import BINDINGS, EVAL_SCORES, METRICS  # noqa: E402,F401 (re-exported)


def slug(label: str) -> str:
    """A variant label as a file name: every run of characters outside ``A-Z a-z 0-9 _ . -``
    becomes ``_`` (so ``MixGRPO-Flash*`` and ``MixGRPO-Flash`` stay apart)."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    return out if out.strip("_.") else "variant"


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_estimate(mean: float, sem: float | None) -> str:
    """``mean ± sem`` at the precision the standard error supports: the SE to two significant digits
    and the mean to the same decimal place (``0.4570 ± 0.0080``, ``12.3 ± 1.5``); values too
    small for four decimals in scientific notation (``1.02e-05 ± 3.1e-07``), never ``0.0000``."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if sem is None or not math.isfinite(sem) or sem <= 0:
        return format_value(mean, 4)
    decimals = max(0, 1 - math.floor(math.log10(sem)))
    if decimals > 4 or (mean != 0 and round(mean, decimals) == 0):
        return f"{mean:.3g} ± {sem:.2g}"
    return f"{mean:.{decimals}f} ± {sem:.{decimals}f}"


def format_difference(diff: float, sem: float | None) -> str:
    """A signed difference ``+0.018 ± 0.004`` at the precision of its standard error."""
    text = format_estimate(diff, sem)
    return text if text.startswith(("-", "n/a")) else "+" + text


def held_out_summary(run_dir: Path) -> list[dict[str, Any]]:
    """Per reward evaluated on held-out prompts: the first and the last evaluation of the run
    (``base`` and ``final``: iteration, mean, SE) and, with per-image scores, the paired gain
    (mean final − base per image and its SE), read from the run's records."""
    from mixgrpo.commands.compare_report import paired_gain

    rows = run_rows(run_dir)
    names = metrics.evaluated_rewards(rows)
    evaluated = [r for r in rows if any(r.get(metrics.evaluation(n, "mean")) is not None for n in names)]
    if not evaluated:
        return []
    out = []
    for name in names:
        with_name = [r for r in evaluated if r.get(metrics.evaluation(name, "mean")) is not None]
        if not with_name:
            continue
        paired = paired_gain(run_dir, name) if len(with_name) > 1 else None
        out.append({"reward": name, "base": _point(with_name[0], name), "final": _point(with_name[-1], name),
                    "evaluations": len(with_name),
                    "paired_gain": None if paired is None else {"mean": paired[0], "sem": paired[1],
                                                                 "images": paired[2]}})
    return out


def _point(row: dict[str, Any], name: str) -> dict[str, Any]:
    return {"iteration": int(row[metrics.ITERATION]), "mean": row[metrics.evaluation(name, "mean")],
            "sem": row.get(metrics.evaluation(name, "sem"))}


#: the held-out measures of the model beside its rewards: (label, mean key, SE key or None)
MEASURES = (("within-prompt diversity", metrics.DIVERSITY_MEAN, metrics.DIVERSITY_SEM),
            ("drift from the base (kl_base)", metrics.KL_BASE_MEAN, None))


def run_rows(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` rows, none when it has none."""
    return read_metrics(run_dir / METRICS) if (run_dir / METRICS).is_file() else []


def run_signals(rows: list[dict]) -> list[str]:
    """``hacking.hacking_signals`` of a run's rows, its trained and held-out rewards read from them."""
    return hacking.hacking_signals(rows, *hacking.roles(rows))


def measure_lines(rows: list[dict]) -> list[str]:
    """Each held-out measure of ``MEASURES`` the run recorded: its first and latest value (± SE)."""
    lines = []
    for label, mean, sem in MEASURES:
        points = [r for r in rows if isinstance(r.get(mean), (int, float)) and math.isfinite(r[mean])]
        if not points:
            continue
        b, f = points[0], points[-1]
        text = f"{label}: {format_estimate(b[mean], b.get(sem))} at iteration {b[metrics.ITERATION]}"
        if len(points) > 1:
            text += f" → {format_estimate(f[mean], f.get(sem))} at iteration {f[metrics.ITERATION]}"
        lines.append(text)
    return lines


def summary_lines(run_dir: Path) -> list[str]:
    """The end of a run in a few lines: each reward's held-out base and final value with their SEs,
    the diversity and the drift from the base, and every sign of reward hacking in words."""
    rows = run_rows(run_dir)
    lines = []
    for s in held_out_summary(run_dir):
        b, f = s["base"], s["final"]
        line = f"  held-out {s['reward']}: {format_estimate(b['mean'], b['sem'])} at iteration {b['iteration']}"
        if s["evaluations"] > 1:
            line += f" → {format_estimate(f['mean'], f['sem'])} at iteration {f['iteration']}"
            if s["paired_gain"] is not None:
                p = s["paired_gain"]
                line += f" (paired gain {format_difference(p['mean'], p['sem'])})"
        lines.append(line)
    lines += [f"  held-out {line}" for line in measure_lines(rows)]
    return lines + [f"  possible reward hacking: {signal}" for signal in run_signals(rows)]


def samples_per_iteration(run_dir: str | Path) -> int | None:
    """The samples one iteration of a run rolls out, ``prompts_per_iteration × group_size``, from its
    ``bindings.json`` (``TrainConfig``'s defaults for what it does not bind); None without the file."""
    import ast

    import attrs

    from mixgrpo.core.config import TrainConfig

    file = Path(run_dir) / BINDINGS
    if not file.is_file():
        return None
    bound = json.loads(file.read_text())
    fields = attrs.fields_dict(TrainConfig)

    def value(name: str) -> int:
        found = [v for k, v in bound.items() if k.split("/")[-1].endswith(f"TrainConfig.{name}")]
        return int(ast.literal_eval(found[-1])) if found else int(fields[name].default)

    return value("prompts_per_iteration") * value("group_size")
