"""The ``mixgrpo`` command line: plugins, train, compare, eval, export, sample, and the commands plugins
add through the ``register_commands`` hook (the shapes world's ``pretrain``, the rewards' ``serve-reward``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixgrpo.core import metrics
from mixgrpo.core.plugins import KINDS, UnknownComponentError, get_plugin_manager


def cmd_plugins(args: argparse.Namespace) -> int:
    pm = get_plugin_manager()
    if args.json:
        data = {
            "components": {kind: {name: {"class": e.gin_name, "plugin": e.plugin, "origin": e.origin}
                                  for name, e in sorted(entries.items())} for kind, entries in pm.registry.items()},
            "failures": [{"plugin": f.plugin, "origin": f.origin, "error": f.error} for f in pm.failures],
        }
        print(json.dumps(data, indent=2))
        return 0
    for kind in KINDS:
        entries = pm.registry[kind]
        print(f"{kind}s:")
        if not entries:
            print("  (none)")
        width = max((len(n) for n in entries), default=0)
        for name, e in sorted(entries.items()):
            print(f"  {name:<{width}}  {e.gin_name:<22} plugin={e.plugin} ({e.origin})")
    if pm.failures:
        print("\nplugins that failed to load:")
        for f in pm.failures:
            print(f"  {f.plugin} ({f.origin}): {f.error}")
    return 0


def _load(args: argparse.Namespace):
    from mixgrpo.core.config import load_config

    bindings = list(args.gin or [])
    if getattr(args, "output", None):
        bindings.append(f"TrainConfig.output_dir = {args.output!r}")
    return load_config(args.config, bindings)


def _run_directory(source: Path) -> Path | None:
    """The run directory a ``train`` source names: the directory itself, or a run's ``config.gin``."""
    from mixgrpo.core import records

    if source.is_dir():
        return source
    if source.name == "config.gin" and (source.parent / records.BINDINGS).is_file():
        return source.parent
    return None


def _train_setup(args: argparse.Namespace):
    """``(config, plugin manager, launch)`` of ``mixgrpo train``: a new run's from the experiment file
    and the bindings given; a resumed run's from the run's own settings with the bindings given now
    on top (``launch``, what the run is recorded to have been started with, grows by them)."""
    from mixgrpo.core import records
    from mixgrpo.core.config import TrainConfig, load_config, parse_gin

    given, source = list(args.gin or []), Path(args.config)
    run_dir = _run_directory(source)
    if run_dir is not None and source.is_dir() and not args.resume:
        raise records.RunDirectoryError(
            f"{source} is a run directory: continue it with `mixgrpo train {source} --resume`, or start a new run "
            f"from an experiment .gin file (its own settings are in {source / 'config.gin'})")
    if not args.resume:
        config, pm = _load(args)
        return config, pm, {"config": str(source), "gin": given, "output": args.output}
    if run_dir is not None:  # the run's own settings, recorded binding by binding
        if args.output and Path(args.output).resolve() != run_dir.resolve():
            raise records.RunDirectoryError(f"--resume {run_dir} with --output {args.output}: a resumed run stays "
                                            f"in its directory; drop --output")
        records.require_run(run_dir)
        recorded = records.recorded_bindings(run_dir)
        before = records.read_launch(run_dir) or {"config": None, "gin": [], "output": None}
        pm = parse_gin([], [*recorded, *given, f"TrainConfig.output_dir = {str(run_dir)!r}"], selected_only=True)
        config = TrainConfig()
        config.validate(pm)
        records.check_resume(run_dir)  # a changed experiment is refused before any model loads
        return config, pm, {**before, "gin": _layered(before["gin"], given)}
    # an experiment file: with the bindings the run was started with, then those given now
    config = pm = None
    if args.output:
        out = Path(args.output)
    else:  # the run directory is the file's output_dir
        config, pm = _load(args)
        out = Path(config.output_dir)
    records.require_run(out)
    before = records.read_launch(out)
    earlier = before["gin"] if before is not None else []  # none recorded: a run from before launch.json
    if earlier or config is None:
        output = [f"TrainConfig.output_dir = {args.output!r}"] if args.output else []
        config, pm = load_config(source, [*earlier, *given, *output])
    records.check_resume(Path(config.output_dir))
    return config, pm, {"config": str(source), "gin": _layered(earlier, given), "output": args.output}


def _layered(before: list[str], given: list[str]) -> list[str]:
    """Command-line bindings of a run resumed with ``given``: the earlier ones, less those given again
    word for word (a later binding wins anyway), then ``given``."""
    return [b for b in before if b not in given] + given


def cmd_train(args: argparse.Namespace) -> int:
    from mixgrpo.core import checkpoint as ckpt
    from mixgrpo.core.scoring import RewardFailure
    from mixgrpo.core.trainer import Trainer

    config, pm, launch = _train_setup(args)
    trainer = Trainer(config, pm)
    trainer.launch = launch
    resume_hint = f"mixgrpo train {trainer.out} --resume"
    try:
        history = trainer.train("resume" if args.resume else "overwrite" if args.overwrite else "new")
    except KeyboardInterrupt:
        found = ckpt.latest(trainer.out / "checkpoints")
        where = f"the last checkpoint is {found}" if found else "no checkpoint was written yet"
        print(f"\nmixgrpo train: interrupted; {where}. Continue with: {resume_hint}", file=sys.stderr)
        return 130
    except RewardFailure as exc:  # the run stopped after checkpointing its last good iteration
        if trainer.accelerator.is_main_process:
            print(f"mixgrpo train: error: {_message(exc)}. Once the reward works again, continue with: "
                  f"{resume_hint}", file=sys.stderr)
        trainer.close()
        return 1
    from mixgrpo.commands import model_card

    model_card.write_for(trainer)  # README.md: what was trained and how it scores, to publish as is
    if trainer.accelerator.is_main_process:
        last = history[-1] if history else {}
        trained = {metrics.reward(name, "mean") for name in config.rewards}
        reached = trainer.start_iteration + len(history)
        now = (f"{len(history)} trained now, from iteration {trainer.start_iteration}" if trainer.start_iteration
               else f"{len(history)} trained")
        print(f"run directory: {trainer.out}  (at iteration {reached} of {config.iterations}; {now})")
        if not history and trainer.start_iteration >= config.iterations:
            print(f"  nothing to train: the checkpoint is at iteration {trainer.start_iteration} and "
                  f"TrainConfig.iterations = {config.iterations}; raise it to continue the run, e.g. "
                  f"{resume_hint} --gin \"TrainConfig.iterations = {trainer.start_iteration + config.iterations}\"")
        from mixgrpo.commands.report import format_value, summary_lines

        for k, v in last.items():
            if k in trained:  # the trained rewards; held-out numbers follow with their SEs
                print(f"  {k} = {format_value(v, 4)} (last iteration)")
        for line in summary_lines(trainer.out):
            print(line)
        if (trainer.out / "README.md").is_file():
            print(f"  model card: {trainer.out / 'README.md'}")
        if trainer.stopped:
            print(f"  {trainer.stopped}; continue with: {resume_hint}")
    trainer.close()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mixgrpo.commands.side_by_side import run_eval, table_lines

    out, data = run_eval(args.config, args.checkpoint, args.out, force=args.force, prompts=args.prompts,
                         seeds=args.seeds, bindings=list(args.gin or []), output=args.output)
    print("\n".join(table_lines(data)))
    print(f"report, grids and results: {out / 'report.md'}, {out / 'results.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mixgrpo.commands.compare import run_compare

    if args.checkpoint:  # checkpoints that exist: evaluated and drawn side by side, nothing trained
        from mixgrpo.commands.side_by_side import run_eval, table_lines

        if not args.output:
            raise ValueError("compare --checkpoint writes its report into --output DIR: name the folder")
        out, data = run_eval(args.config, args.checkpoint, args.output, force=args.force, prompts=args.prompts,
                             seeds=args.seeds, bindings=list(args.gin or []), title="Comparison of checkpoints")
        print("\n".join(table_lines(data)))
        print(f"report: {out / 'report.md'}")
        return 0

    run_compare(args.config, list(args.gin or []), output=args.output, variants=args.variant)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mixgrpo.commands.export import export_run

    info = export_run(args.run_dir, args.to, checkpoint=args.checkpoint, force=args.force,
                      max_shard_size=args.max_shard_size, bindings=list(args.gin or []))
    print(f"exported {info['checkpoint']} ({info['kind']}) to {args.to}")
    print(f"  load: {info['load']}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from mixgrpo.commands.sample import run_sample

    manifest = run_sample(args.source, args.prompts, args.out, checkpoint=args.checkpoint, seeds=args.seeds,
                          steps=args.steps, solver=args.solver, guidance=args.guidance, shift=args.shift,
                          batch_size=args.batch_size, height=args.height, width=args.width,
                          bindings=list(args.gin or []), force=args.force)
    print(f"{len(manifest['images'])} images of {manifest['checkpoint']} in {args.out}")
    return 0


CHECKPOINT_SPECS = ("base, latest, an iteration (40), a name (iter_000040), a checkpoint folder, or another run "
                    "directory (its latest checkpoint); LABEL= names the row")


GIN_HELP = "extra gin binding, e.g. --gin \"TrainConfig.iterations = 10\" (repeatable)"
CHECKPOINT_HELP = ("latest (default), base (the base model), an iteration (40), a name (iter_000040) "
                   "or a checkpoint folder")


def _with_grid(p: argparse.ArgumentParser) -> None:
    """The options of the side-by-side grids of ``compare --checkpoint`` and ``eval``."""
    p.add_argument("--prompts", metavar="FILE|TEXT", help="prompts of the side-by-side grids (default: the "
                                                          "first 4 of the run's sample-grid prompts)")
    p.add_argument("--seeds", help="seeds (grid columns), e.g. 0-3 (default: the config's seed and the next 3)")
    p.add_argument("--force", action="store_true", help="write into a non-empty report folder")


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train one experiment, or continue a run (mixgrpo train RUN_DIR --resume)")
    p.add_argument("config", help="experiment .gin file; with --resume also a run directory (its own settings)")
    p.add_argument("--gin", action="append", metavar="BINDING",
                   help=f"{GIN_HELP}; on --resume, applied on top of the run's settings")
    p.add_argument("--output", help="run directory (overrides TrainConfig.output_dir)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run from its latest checkpoint, with its own settings and the --gin "
                            "bindings given now")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in a run directory that holds a run (deletes its records and checkpoints)")
    p.set_defaults(func=cmd_train)


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="train several variants on the same prompts, seeds and budget; write report.md")
    p.add_argument("config", help="comparison .gin file (binds CompareConfig.base and CompareConfig.variants)")
    p.add_argument("--gin", action="append", metavar="BINDING", help=GIN_HELP)
    p.add_argument("--output", help="comparison directory")
    p.add_argument("--variant", action="append", metavar="NAME=FILE.gin|BINDING[;BINDING]",
                   help="a variant (repeatable); overrides the variants the config lists")
    p.add_argument("--checkpoint", action="append", metavar="[LABEL=]CHECKPOINT",
                   help="compare existing checkpoints instead of training (repeatable; CONFIG is then a run "
                        "directory or gin file whose evaluation settings apply): " + CHECKPOINT_SPECS)
    _with_grid(p)
    p.set_defaults(func=cmd_compare)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="score checkpoints on held-out prompts with every configured reward; write a "
                                    "report with a side-by-side grid per prompt (default into RUN/eval)")
    p.add_argument("config", help="run directory, or experiment .gin file (its output_dir is the run)")
    p.add_argument("--gin", action="append", metavar="BINDING", help="extra gin binding (repeatable)")
    p.add_argument("--output", help="run directory holding checkpoints/ (with a gin file; overrides its output_dir)")
    p.add_argument("--checkpoint", action="append", metavar="[LABEL=]CHECKPOINT",
                   help="repeatable; default the latest (the base model without one): " + CHECKPOINT_SPECS)
    p.add_argument("--out", metavar="DIR", help="report folder (default RUN/eval; missing or empty, unless --force)")
    _with_grid(p)
    p.set_defaults(func=cmd_eval)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="write a run's checkpoint for diffusers: a LoRA adapter for "
                                      "load_lora_weights, or a transformer folder for from_pretrained")
    p.add_argument("run_dir", help="run directory (holds config.gin and checkpoints/)")
    p.add_argument("--to", required=True, metavar="DIR", help="output folder (missing or empty, unless --force)")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP.replace("base (the base model), ", ""))
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard of a full export (5GB)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--gin", action="append", metavar="BINDING", help="extra gin binding (repeatable)")
    p.set_defaults(func=cmd_export)


def _add_sample(sub: Any) -> None:
    p = sub.add_parser("sample", help="draw images of a run (or a config's base model) for a list of prompts")
    p.add_argument("source", help="run directory, or experiment .gin file (its base model)")
    p.add_argument("--prompts", required=True, metavar="FILE|DIR|TEXT",
                   help="a text file, one prompt a line, or a prompt; for an editing backbone (FLUX.1-Kontext) a "
                        "JSONL file of edits, one {\"image\": ..., \"instruction\": ...} a line, or a folder of "
                        "images with same-named .txt instructions")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (missing or empty, unless --force)")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--seeds", help="e.g. 0,1,2 or 0-3 (default: the config's seed, that of the run's grids)")
    p.add_argument("--steps", type=int, help="ODE steps (default: TrainConfig.num_steps)")
    p.add_argument("--solver", help="ODE solver (default: TrainConfig.eval_solver)")
    p.add_argument("--guidance", type=float, help="guidance scale: embedded guidance of FLUX.1-dev-like models, "
                                                  "else classifier-free guidance")
    p.add_argument("--shift", type=float, help="static shift of the sigma grid (default: TrainConfig.shift)")
    p.add_argument("--batch-size", type=int, help="images per model call (default: TrainConfig.rollout_batch_size)")
    p.add_argument("--height", type=int, metavar="H", help="image height in pixels (default: the config's); a "
                                                           "dynamic sigma grid's mu follows the size")
    p.add_argument("--width", type=int, metavar="W", help="image width in pixels (default: the config's)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--gin", action="append", metavar="BINDING", help="extra gin binding (repeatable)")
    p.set_defaults(func=cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    """The ``mixgrpo`` parser: the built-in commands, then each command a plugin registers (a plugin
    cannot replace a built-in one)."""
    parser = argparse.ArgumentParser(prog="mixgrpo", description=_plain(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list every registered component by kind, and load failures")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)
    for add in (_add_train, _add_compare, _add_eval, _add_export, _add_sample):
        add(sub)
    for name, (help_text, configure, run, _plugin) in sorted(get_plugin_manager().commands().items()):
        if name in sub.choices:
            continue
        p = sub.add_parser(name, help=_plain(help_text))
        configure(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import mixgrpo.commands.compare  # noqa: F401  (registers CompareConfig: any gin file parsed here may bind it)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from mixgrpo.core.records import StorageError
    from mixgrpo.core.scoring import RewardFailure

    try:
        return args.func(args)
    except (RewardFailure, StorageError) as exc:  # the run itself failed: not a usage error
        print(f"mixgrpo {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 1
    except (UnknownComponentError, ValueError, FileNotFoundError, NotImplementedError, ImportError) as exc:
        print(f"mixgrpo {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


def _plain(text: str | None) -> str | None:
    """Help text without the docstrings' reStructuredText literal markers (````name```` → ``name``)."""
    return text.replace("``", "") if text else text


def _message(exc: BaseException) -> str:
    """The error's own message, without the lines gin appends about the configurable it was raised in."""
    return str(exc).split("\n  In call to configurable")[0].strip()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
