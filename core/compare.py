"""Head-to-head comparisons: several variants on the same prompts, seeds and budget → report.md.

A variant is a gin file (a method preset) or a list of bindings; the comparison's ``base`` file is
applied after a variant file and before variant bindings, so it holds what all variants share (the
world, the budget), while the variant holds what differs (the method, or one swapped component).
Each (variant, seed) run lives in ``<output>/<variant>/seed_<k>/`` and is skipped when it has
finished, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import gin
from mixgrpo.core.config import ConfigError, TrainConfig, _search_paths, parse_gin
from mixgrpo.core.plugins import get_plugin_manager

DONE = "done.json"


@gin.configurable
@attrs.define
class CompareConfig:
    """What to compare.

    Args:
        base: gin file applied to every variant (after a variant file, before variant bindings).
        variants: ``{label: "file.gin"}`` or ``{label: ["binding", ...]}`` or
            ``{label: ["file.gin", "binding", ...]}``; files are found like gin includes.
        seeds: training seeds; every variant runs once per seed.
        output_dir: where runs and the report go.
        metric: the reward reported and plotted (default: the first trained reward).
    """

    base: str = gin.REQUIRED
    variants: dict[str, Any] = gin.REQUIRED
    seeds: tuple[int, ...] = (0, 1)
    output_dir: str = "runs/compare"
    metric: str | None = None


def _resolve(name: str, search: Sequence[Path]) -> Path:
    for folder in [Path.cwd(), *search]:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"variant file {name!r} not found (looked in {', '.join(str(s) for s in search)})")


def _split_variant(value: Any, search: Sequence[Path]) -> tuple[list[Path], list[str]]:
    items = [value] if isinstance(value, str) else list(value)
    files = [_resolve(v, search) for v in items if v.endswith(".gin")]
    bindings = [v for v in items if not v.endswith(".gin")]
    return files, bindings


def _variant_arg(text: str) -> tuple[str, list[str]]:
    """``NAME=file.gin`` or ``NAME=binding;binding`` (the ``--variant`` argument) → (name, items)."""
    if "=" not in text or text.index("=") == 0:
        raise ConfigError(f"--variant {text!r}: expected NAME=FILE.gin or NAME=BINDING[;BINDING]")
    name, rest = text.split("=", 1)
    if rest.strip().endswith(".gin"):
        return name.strip(), [rest.strip()]
    return name.strip(), [b.strip() for b in rest.split(";") if b.strip()]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "variant"


def run_compare(config_file: str | Path, bindings: Sequence[str] = (), output: str | None = None,
                variants: Sequence[str] | None = None) -> Path:
    """Run every variant × seed (skipping finished runs), then write the report. Returns its path."""
    from mixgrpo.core.trainer import Trainer

    pm = get_plugin_manager()
    parse_gin([config_file], bindings, pm)
    cfg = CompareConfig()
    chosen = dict(_variant_arg(v) for v in variants) if variants else dict(cfg.variants)
    out = Path(output or cfg.output_dir)
    search = _search_paths(Path(config_file))
    base = _resolve(cfg.base, search)
    plans = {label: _split_variant(value, search) for label, value in chosen.items()}
    runs: dict[str, list[Path]] = {}
    started = time.perf_counter()
    for label, (files, extra) in plans.items():
        runs[label] = []
        for seed in cfg.seeds:
            run_dir = out / _slug(label) / f"seed_{seed}"
            runs[label].append(run_dir)
            if (run_dir / DONE).is_file():
                print(f"[compare] {label} seed {seed}: finished earlier, kept")
                continue
            parse_gin([*files, base], [*extra, *bindings, f"TrainConfig.seed = {seed}",
                                       f"TrainConfig.output_dir = '{run_dir}'"], pm)
            train_cfg = TrainConfig()
            train_cfg.validate(pm)
            print(f"[compare] {label} seed {seed}: {train_cfg.iterations} iterations → {run_dir}")
            if (run_dir / "metrics.jsonl").exists():
                (run_dir / "metrics.jsonl").unlink()  # an unfinished run restarts cleanly
            trainer = Trainer(train_cfg, pm)
            trainer.train()
            (run_dir / DONE).write_text(json.dumps({"seconds": time.perf_counter() - started}))
    from mixgrpo.core.compare_report import write_report

    return write_report(out, runs, metric=cfg.metric)


def combine_sem(sems: Sequence[float]) -> float:
    """Standard error of the mean of k independent run means with standard errors ``sems``."""
    k = len(sems)
    return math.sqrt(sum(s * s for s in sems)) / k if k else float("nan")
