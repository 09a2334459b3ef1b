"""Head-to-head comparisons: several variants on the same prompts, seeds and budget → report.md.

A *compare file* binds ``CompareConfig.base`` (a gin file every variant shares: the world, the
budget) and ``CompareConfig.variants`` (what differs: a method preset, or one swapped component);
``experiments/shapes/compare.gin`` is one. A plain experiment file is trained with ``mixgrpo train``.

Each run's gin is parsed in this order, a later one winning where two bind the same parameter:

1. the variant's gin files;
2. the ``base`` file;
3. the compare file itself: its own bindings that are not ``CompareConfig``'s (say
   ``TrainConfig.eval_every = 5``) apply to every run;
4. the variant's bindings;
5. the command line's ``--gin`` bindings;

and last each run's ``TrainConfig.seed`` (from ``CompareConfig.seeds``) and ``output_dir``.

Each (variant, seed) run lives in ``<output>/<variant>/seed_<k>/`` and is skipped when it has
finished, so an interrupted comparison resumes where it stopped. Every run to train is parsed and
checked before the first one starts: a typo in the last variant, a run without held-out evaluation
(``TrainConfig.eval_every = 0``) or a ``CompareConfig.metric`` a run does not evaluate is refused
(a ``ConfigError``) before anything is trained or written.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import gin

from mixgrpo.commands import base_eval, model_card
from mixgrpo.commands.report import slug
from mixgrpo.core import records
from mixgrpo.core.config import ConfigError, TrainConfig, parse_gin
from mixgrpo.core.gin_files import _search_paths
from mixgrpo.core.plugins import get_plugin_manager

DONE = "done.json"
BASE_CACHE = "base_eval"
EXAMPLE = "experiments/shapes/compare.gin"


@gin.configurable
@attrs.define
class CompareConfig:
    """What to compare.

    Args:
        base: gin file applied to every variant (after a variant file, before variant bindings).
        variants: ``{label: "file.gin"}`` or ``{label: ["binding", ...]}`` or
            ``{label: ["file.gin", "binding", ...]}``; files are found like gin includes.
        seeds: training seeds; every variant runs once per seed. With several, the report adds a row
            per seed and the gain's spread between seeds (mean ± SE over seeds).
        output_dir: where runs and the report go.
        metric: the reward reported and plotted (default: the first trained reward).
        workers: runs trained at once, each in its own process with ``cpu_count / workers`` torch
            threads. On a small model, two one-thread processes on two cores train nearly twice as
            many runs per minute as one two-thread process; every run still sees the same
            conditions, so timings stay comparable within the comparison.
        start_first: labels of variants whose runs start before the others', in this order (the
            rest follow in ``variants``' order). With several workers, list the longest runs: a long
            run started last keeps one worker busy while the others idle. The report keeps the
            variants' order.

    Precedence of a run's gin, later winning: the variant's files < ``base`` < the compare file's
    own bindings (any binding in it that is not ``CompareConfig``'s applies to every run) < the
    variant's bindings < the command line's ``--gin``; then the run's seed and output folder.
    """

    base: str = gin.REQUIRED
    variants: dict[str, Any] = gin.REQUIRED
    seeds: tuple[int, ...] = (0, 1)
    output_dir: str = "runs/compare"
    metric: str | None = None
    workers: int = 1
    start_first: tuple[str, ...] = ()


def _resolve(name: str, search: Sequence[Path]) -> Path:
    for folder in [Path.cwd(), *search]:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"variant file {name!r} not found (looked in {', '.join(str(s) for s in search)})")


def _split_variant(label: str, value: Any, search: Sequence[Path]) -> tuple[list[Path], list[str]]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    if not items or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"CompareConfig.variants[{label!r}] = {value!r}: a variant is a gin file "
                          "('methods/mixgrpo.gin'), a list of bindings, or a list of files and bindings "
                          "(['methods/mixgrpo.gin', 'ProgressiveWindow.window_size = 2'])")
    files = [_resolve(v, search) for v in items if v.endswith(".gin")]
    bindings = [v for v in items if not v.endswith(".gin")]
    return files, bindings


_BINDING = re.compile(r"^\s*%?[A-Za-z_][\w./]*\s*=")


def _variant_arg(text: str) -> tuple[str, list[str]]:
    """``NAME=file.gin`` or ``NAME=binding;binding`` (the ``--variant`` argument) → (name, items).

    The name may hold ``=`` itself (``G=4=methods/mixgrpo.gin;TrainConfig.group_size = 4``): it ends
    at the first ``=`` after which comes a gin file or a binding."""
    splits = [i for i, ch in enumerate(text) if ch == "=" and i > 0]
    if not splits:
        raise ConfigError(f"--variant {text!r}: expected NAME=FILE.gin or NAME=BINDING[;BINDING]")

    def reads(rest: str) -> bool:
        first = rest.split(";", 1)[0].strip()
        return (first.endswith(".gin") and "=" not in first) or bool(_BINDING.match(first))

    at = next((i for i in splits if reads(text[i + 1:])), splits[0])
    name, items = text[:at].strip(), [b.strip() for b in text[at + 1:].split(";") if b.strip()]
    if not name or not items:
        raise ConfigError(f"--variant {text!r}: expected NAME=FILE.gin or NAME=BINDING[;BINDING]")
    return name, items


def _is_compare_binding(key: str) -> bool:
    """Whether a ``records.snapshot()`` key binds a parameter of ``CompareConfig``."""
    owner = key.rpartition("/")[2].rpartition(".")[0]
    return owner.rpartition(".")[2] == "CompareConfig"


def _short(key: str) -> str:
    """A ``records.snapshot()`` key as one writes it: ``[scope/]Class.param``, or a macro's name."""
    scope, _, name = key.lstrip("%").rpartition("/")
    name = ".".join(name.split(".")[-2:]) if not key.startswith("%") else name
    return f"{scope}/{name}" if scope else name


def _drop_compare_bindings() -> None:
    """Remove ``CompareConfig``'s bindings from the parsed gin config: a run's records
    (``bindings.json``) then hold what it trained with, not the comparison around it."""
    for key in [k for k in gin.config._CONFIG if k[1].rpartition(".")[2] == "CompareConfig"]:
        del gin.config._CONFIG[key]


def _train_config(files: Sequence[Path], bindings: Sequence[str], seed: int, run_dir: Path, pm: Any) -> TrainConfig:
    """Parse one (variant, seed) run's gin (its files in order, then the bindings) into a validated config."""
    parse_gin(files, [*bindings, f"TrainConfig.seed = {seed}", f"TrainConfig.output_dir = '{run_dir}'"], pm,
              selected_only=True)  # a variant that switches a component needs none of the other's paths
    _drop_compare_bindings()
    config = TrainConfig()
    config.validate(pm)
    return config


def _run_one(files: Sequence[Path], bindings: Sequence[str], seed: int, run_dir: Path,
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
    config = _train_config(files, [*bindings, *(["TrainConfig.progress = False"] if threads else [])],
                           seed, run_dir, pm)
    trainer = Trainer(config, pm)
    if base_cache is not None:  # the base model's evaluation, shared by the runs that would compute it alike
        trainer.base_evaluation = base_eval.shared(base_cache)
    if base_only:  # the shared base evaluation alone, into the cache, before the runs start
        run_dir.mkdir(parents=True, exist_ok=True)
        base_eval.evaluate_base(trainer, {}, base_cache)
        return time.perf_counter() - started
    trainer.train("overwrite")  # an unfinished run restarts cleanly
    model_card.write_for(trainer)
    seconds = time.perf_counter() - started
    (run_dir / DONE).write_text(json.dumps({"seconds": seconds}))
    return seconds


def _not_a_comparison(config_file: Path, missing: list[str], bound: set[str]) -> ConfigError:
    what = " and ".join(f"CompareConfig.{m}" for m in missing)
    head = (f"{config_file} is not a compare file: it binds no CompareConfig" if not bound else
            f"{config_file} binds {', '.join(f'CompareConfig.{b}' for b in sorted(bound))} but not {what}")
    return ConfigError(
        f"{head}. A compare file binds CompareConfig.base (a gin file every variant shares: the world, the "
        f"budget) and CompareConfig.variants ({{'label': 'methods/mixgrpo.gin', 'other': ['methods/mixgrpo.gin', "
        f"'BINDING', ...]}}), as {EXAMPLE} does (variants may also come from --variant NAME=FILE.gin); its other "
        f"bindings apply to every run. To train a single experiment, use `mixgrpo train {config_file}`")


def _compare_config(config_file: Path, have_variants: bool) -> CompareConfig:
    """The parsed ``CompareConfig``, every field checked (a ``ConfigError`` naming the fix, never gin's
    error about a missing required binding)."""
    bound = {key.rpartition(".")[2] for key in records.snapshot() if _is_compare_binding(key)}
    missing = [name for name in ("base", "variants")
               if name not in bound and not (name == "variants" and have_variants)]
    if missing:
        raise _not_a_comparison(config_file, missing, bound)
    cfg = CompareConfig() if "variants" in bound else CompareConfig(variants={})
    if not isinstance(cfg.base, str) or not cfg.base.endswith(".gin"):
        raise ConfigError(f"CompareConfig.base = {cfg.base!r}: name the gin file every variant shares, e.g. "
                          "CompareConfig.base = 'shapes/world.gin'")
    if not isinstance(cfg.variants, dict) or not (cfg.variants or have_variants):
        raise ConfigError(f"CompareConfig.variants = {cfg.variants!r}: a dict {{label: 'file.gin' or [bindings]}} "
                          f"of at least one variant, e.g. {{'MixGRPO': 'methods/mixgrpo.gin'}} (see {EXAMPLE})")
    if not all(isinstance(label, str) and label.strip() for label in cfg.variants):
        raise ConfigError(f"CompareConfig.variants: every label must be a non-empty string, got {list(cfg.variants)}")
    seeds = cfg.seeds
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds)):
        raise ConfigError(f"CompareConfig.seeds = {seeds!r}: a tuple of distinct integer training seeds, e.g. "
                          "CompareConfig.seeds = (0,) or (0, 1, 2)")
    if not isinstance(cfg.workers, int) or cfg.workers < 1:
        raise ConfigError(f"CompareConfig.workers must be >= 1, got {cfg.workers!r}")
    first = cfg.start_first
    if not isinstance(first, (list, tuple)) or not all(isinstance(label, str) for label in first):
        raise ConfigError(f"CompareConfig.start_first = {first!r}: a tuple of variant labels, e.g. "
                          "('TempFlow-GRPO', 'GRPO-Guard')")
    unknown = [label for label in first if label not in cfg.variants]
    if unknown and cfg.variants:
        raise ConfigError(f"CompareConfig.start_first names {', '.join(repr(u) for u in unknown)}, not a label of "
                          f"CompareConfig.variants ({', '.join(repr(v) for v in cfg.variants)}): fix the label or "
                          "drop it")
    if cfg.metric is not None and not isinstance(cfg.metric, str):
        raise ConfigError(f"CompareConfig.metric = {cfg.metric!r}: a reward's name, e.g. 'shapes.composition'")
    if not isinstance(cfg.output_dir, str) or not cfg.output_dir:
        raise ConfigError(f"CompareConfig.output_dir = {cfg.output_dir!r}: a folder, e.g. 'runs/compare'")
    return cfg


def _check_runs(checks: list[tuple[str, int, TrainConfig]], metric: str | None, config_file: Path) -> str | None:
    """Refuse runs the report could not compare: one without held-out evaluation
    (``TrainConfig.eval_every = 0``), or one that does not evaluate the compared reward. Returns
    that reward (``CompareConfig.metric``, else the first run's first trained reward)."""
    if not checks:
        return metric
    silent = list(dict.fromkeys(label for label, _, config in checks if config.eval_every <= 0))
    if silent:
        iterations = next(config.iterations for label, _, config in checks if label == silent[0])
        raise ConfigError(
            f"no held-out evaluation in {', '.join(repr(s) for s in silent)} (TrainConfig.eval_every = 0), and a "
            f"comparison reports held-out rewards: nothing was trained. Evaluate every run with "
            f"--gin \"TrainConfig.eval_every = {iterations}\" (the base model and the last iteration; a smaller N "
            f"adds points to the curves), or add the line `TrainConfig.eval_every = N` to {config_file}")
    chosen = metric or next(iter(checks[0][2].rewards))
    blind = {label: [*config.rewards, *config.eval_rewards] for label, _, config in checks
             if chosen not in config.rewards and chosen not in config.eval_rewards}
    if blind:
        label, names = next(iter(blind.items()))
        fix = ("set CompareConfig.metric to a reward every variant evaluates" if metric is None else
               "name one of them in CompareConfig.metric")
        raise ConfigError(
            f"the comparison's reward {chosen!r} ({'CompareConfig.metric' if metric else 'the first trained reward'})"
            f" is not evaluated by {', '.join(repr(b) for b in blind)} ({label!r} evaluates {', '.join(names)}): "
            f"{fix}, or add {chosen!r} to TrainConfig.eval_rewards")
    return chosen


def run_compare(config_file: str | Path, bindings: Sequence[str] = (), output: str | None = None,
                variants: Sequence[str] | None = None) -> Path:
    """Run every variant × seed (skipping finished runs), then write the report. Returns its path.

    Every run's config is parsed and checked before the first one starts (``_check_runs``), so a
    typo in the last variant, or a run the report could not compare, fails at once instead of after
    the others have trained; nothing is written before then.
    """
    pm = get_plugin_manager()
    config_file = Path(config_file)
    parse_gin([config_file], [], pm)
    shared = [f"{_short(key)} = {value}" for key, value in records.snapshot().items() if not _is_compare_binding(key)]
    parse_gin([config_file], bindings, pm)
    cfg = _compare_config(config_file, bool(variants))
    if shared:
        print(f"[compare] every run takes {config_file.name}'s own bindings (after the base file, before the variant's "
              f"bindings and --gin): {'; '.join(shared)}")
    chosen = dict(_variant_arg(v) for v in variants) if variants else dict(cfg.variants)
    out = Path(output or cfg.output_dir)
    search = _search_paths(config_file)
    base = _resolve(cfg.base, search)
    search += [p for p in _search_paths(base) if p not in search]  # variants may sit beside the base
    plans = {label: _split_variant(label, value, search) for label, value in chosen.items()}
    folders: dict[str, str] = {}
    for label in plans:
        if (other := folders.setdefault(slug(label), label)) != label:
            raise ConfigError(f"variants {other!r} and {label!r} would share the run folder {slug(label)!r} "
                              "(labels differ only in characters outside A-Z a-z 0-9 _ . -): rename one")
    runs: dict[str, list[Path]] = {label: [] for label in plans}
    jobs, checks = [], []
    for label, (files, extra) in plans.items():
        run_files = [*files, base, config_file]  # precedence: the module docstring
        for seed in cfg.seeds:
            run_dir = out / slug(label) / f"seed_{seed}"
            runs[label].append(run_dir)
            if (run_dir / DONE).is_file():
                print(f"[compare] {label} seed {seed}: finished earlier, kept")
                continue
            checks.append((label, seed, _train_config(run_files, [*extra, *bindings], seed, run_dir, pm)))
            jobs.append((label, seed, (run_files, [*extra, *bindings], seed, run_dir)))
    metric = _check_runs(checks, cfg.metric, config_file)
    jobs = start_order(jobs, cfg.start_first)
    cache = out / BASE_CACHE  # the base model's evaluation, computed once for all runs that share it
    if cfg.workers == 1 or len(jobs) <= 1:
        for label, seed, job in jobs:
            print(f"[compare] {label} seed {seed} → {job[-1]}")
            _run_one(*job, base_cache=cache)
    else:
        _run_parallel(jobs, cfg.workers, cache)
    from mixgrpo.commands.compare_report import write_report
    from mixgrpo.commands.side_by_side import compare_runs_side_by_side

    side = compare_runs_side_by_side(out, runs)  # None when the runs kept no checkpoint
    if side is None:
        print("[compare] no side-by-side grids: the runs kept no checkpoint (TrainConfig.checkpoint_every = 0)")
    return write_report(out, runs, metric=metric, side_by_side=side)


def start_order(jobs: list, first: Sequence[str]) -> list:
    """``jobs`` (label first) with those of the ``first`` labels moved to the front, in that order;
    the rest, and the seeds within a label, keep their order."""
    rank = {label: k for k, label in enumerate(first)}
    return sorted(jobs, key=lambda job: rank.get(job[0], len(rank)))  # sorted is stable


def _run_parallel(jobs: list, workers: int, cache: Path) -> None:
    """Run the jobs in ``workers`` spawned processes, the CPU threads split evenly between them; the
    first job's base evaluation runs first, alone and on every core, so that no two runs compute it at
    once (the thread count does not change its numbers: tests/core/test_compare.py)."""
    import concurrent.futures
    import multiprocessing
    import os

    from mixgrpo.core.progress import progress_bar

    threads = max(1, (os.cpu_count() or 1) // workers)
    print(f"[compare] {len(jobs)} runs in {workers} processes of {threads} thread(s) each")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        files, bindings, seed, _ = jobs[0][2]
        seconds = pool.submit(_run_one, files, bindings, seed, cache / "run", threads=os.cpu_count() or 1,
                              base_cache=cache, base_only=True).result()  # alone: every core
        print(f"[compare] base model evaluated once for all runs in {seconds:.0f} s")
        futures = {pool.submit(_run_one, *job, threads=threads, base_cache=cache): (label, seed)
                   for label, seed, job in jobs}
        with progress_bar(total=len(jobs), desc="compare", unit="run") as bar:
            for future in concurrent.futures.as_completed(futures):
                label, seed = futures[future]
                bar.write(f"[compare] {label} seed {seed}: done in {future.result():.0f} s")
                bar.update(1)
