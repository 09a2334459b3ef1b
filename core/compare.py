"""Head-to-head comparisons: several variants on the same prompts, seeds and budget → report.md.

A variant is a gin file (a method preset) or a list of bindings; the comparison's ``base`` file is
applied after a variant file and before variant bindings, so it holds what all variants share (the
world, the budget), while the variant holds what differs (the method, or one swapped component).
Each (variant, seed) run lives in ``<output>/<variant>/seed_<k>/`` and is skipped when it has
finished, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import gin

from mixgrpo.core.config import ConfigError, TrainConfig, _search_paths, parse_gin
from mixgrpo.core.plugins import get_plugin_manager
from mixgrpo.core.report import slug

DONE = "done.json"
BASE_CACHE = "base_eval"


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
        workers: runs trained at once, each in its own process with ``cpu_count / workers`` torch
            threads. On a small model, two one-thread processes on two cores train nearly twice as
            many runs per minute as one two-thread process; every run still sees the same
            conditions, so timings stay comparable within the comparison.
    """

    base: str = gin.REQUIRED
    variants: dict[str, Any] = gin.REQUIRED
    seeds: tuple[int, ...] = (0, 1)
    output_dir: str = "runs/compare"
    metric: str | None = None
    workers: int = 1


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


def _train_config(files: Sequence[Path], base: Path, bindings: Sequence[str], seed: int, run_dir: Path,
                  pm: Any) -> TrainConfig:
    """Parse one (variant, seed) run's gin (variant files, base, bindings) into a validated config."""
    parse_gin([*files, base], [*bindings, f"TrainConfig.seed = {seed}", f"TrainConfig.output_dir = '{run_dir}'"], pm)
    config = TrainConfig()
    config.validate(pm)
    return config


def _run_one(files: Sequence[Path], base: Path, bindings: Sequence[str], seed: int, run_dir: Path,
             threads: int | None = None, base_cache: Path | None = None, base_only: bool = False) -> float:
    """Train one (variant, seed) run from scratch in this process; returns its seconds.

    With ``threads`` (a worker of a parallel comparison) torch uses that many threads and the
    per-iteration progress bar is off (the parent shows one bar over runs).
    """
    from mixgrpo.core.trainer import Trainer

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    started = time.perf_counter()
    pm = get_plugin_manager()
    config = _train_config(files, base, [*bindings, *(["TrainConfig.progress = False"] if threads else [])],
                           seed, run_dir, pm)
    trainer = Trainer(config, pm)
    trainer.base_cache = base_cache
    if base_only:  # the shared base evaluation alone, into the cache, before the runs start
        from mixgrpo.core.base_eval import evaluate_base

        run_dir.mkdir(parents=True, exist_ok=True)
        evaluate_base(trainer, {}, base_cache)
        return time.perf_counter() - started
    trainer.train("overwrite")  # an unfinished run restarts cleanly
    seconds = time.perf_counter() - started
    (run_dir / DONE).write_text(json.dumps({"seconds": seconds}))
    return seconds


def run_compare(config_file: str | Path, bindings: Sequence[str] = (), output: str | None = None,
                variants: Sequence[str] | None = None) -> Path:
    """Run every variant × seed (skipping finished runs), then write the report. Returns its path.

    Every run's config is parsed and validated before the first one starts, so a typo in the last
    variant fails at once instead of after the others have trained.
    """
    pm = get_plugin_manager()
    parse_gin([config_file], bindings, pm)
    cfg = CompareConfig()
    if cfg.workers < 1:
        raise ConfigError(f"CompareConfig.workers must be >= 1, got {cfg.workers}")
    chosen = dict(_variant_arg(v) for v in variants) if variants else dict(cfg.variants)
    out = Path(output or cfg.output_dir)
    search = _search_paths(Path(config_file))
    base = _resolve(cfg.base, search)
    search += [p for p in _search_paths(base) if p not in search]  # variants may sit beside the base
    plans = {label: _split_variant(value, search) for label, value in chosen.items()}
    folders: dict[str, str] = {}
    for label in plans:
        if (other := folders.setdefault(slug(label), label)) != label:
            raise ConfigError(f"variants {other!r} and {label!r} would share the run folder {slug(label)!r} "
                              "(labels differ only in characters outside A-Z a-z 0-9 _ . -): rename one")
    runs: dict[str, list[Path]] = {label: [] for label in plans}
    jobs = []
    for label, (files, extra) in plans.items():
        for seed in cfg.seeds:
            run_dir = out / slug(label) / f"seed_{seed}"
            runs[label].append(run_dir)
            if (run_dir / DONE).is_file():
                print(f"[compare] {label} seed {seed}: finished earlier, kept")
                continue
            _train_config(files, base, [*extra, *bindings], seed, run_dir, pm)  # fail early on a bad variant
            jobs.append((label, seed, (files, base, [*extra, *bindings], seed, run_dir)))
    cache = out / BASE_CACHE  # the base model's evaluation, computed once for all runs that share it
    if cfg.workers == 1 or len(jobs) <= 1:
        for label, seed, job in jobs:
            print(f"[compare] {label} seed {seed} → {job[-1]}")
            _run_one(*job, base_cache=cache)
    else:
        _run_parallel(jobs, cfg.workers, cache)
    from mixgrpo.core.compare_report import write_report
    from mixgrpo.core.side_by_side import compare_runs_side_by_side

    side = compare_runs_side_by_side(out, runs)  # None when the runs kept no checkpoint
    if side is None:
        print("[compare] no side-by-side grids: the runs kept no checkpoint (TrainConfig.checkpoint_every = 0)")
    return write_report(out, runs, metric=cfg.metric, side_by_side=side)


def _run_parallel(jobs: list, workers: int, cache: Path) -> None:
    """Run the jobs in ``workers`` spawned processes, the CPU threads split evenly between them; the
    first job's base evaluation runs first, alone, so that no two runs compute it at once."""
    import concurrent.futures
    import multiprocessing
    import os

    from tqdm.auto import tqdm

    threads = max(1, (os.cpu_count() or 1) // workers)
    print(f"[compare] {len(jobs)} runs in {workers} processes of {threads} thread(s) each")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        files, base, bindings, seed, _ = jobs[0][2]
        seconds = pool.submit(_run_one, files, base, bindings, seed, cache / "run", threads=threads,
                              base_cache=cache, base_only=True).result()
        print(f"[compare] base model evaluated once for all runs in {seconds:.0f} s")
        futures = {pool.submit(_run_one, *job, threads=threads, base_cache=cache): (label, seed)
                   for label, seed, job in jobs}
        with tqdm(total=len(jobs), desc="compare", unit="run") as bar:
            for future in concurrent.futures.as_completed(futures):
                label, seed = futures[future]
                bar.write(f"[compare] {label} seed {seed}: done in {future.result():.0f} s")
                bar.update(1)
