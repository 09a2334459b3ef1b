"""The everyday workflow, run as a user types it: a resume continues the run with its own settings
(only the bindings given at the resume change, each printed and recorded), every run keeps its
weights, the commands its model card prints work as written, and the small things a new user meets
on day one (the summary line, progress in log files, --help, an unusable output directory)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mixgrpo.commands.cli import build_parser, main
from mixgrpo.core import records
from mixgrpo.core.records import read_rows

from .conftest import ROOT

SMOKE = str(ROOT / "experiments" / "runs" / "toy_smoke.gin")
QUIET = ["--gin", "TrainConfig.progress = False", "--gin", "TrainConfig.tensorboard = False"]


def _lr(run: Path, iteration: int) -> float:
    groups = json.loads((run / "checkpoints" / f"iter_{iteration:06d}" / "optimizer.json").read_text())
    found = {g["lr"] for g in (groups["param_groups"] if isinstance(groups, dict) else groups)}
    assert len(found) == 1
    return found.pop()


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("iter_*"))


def _started(tmp_path: Path) -> Path:
    run = tmp_path / "R"
    assert main(["train", SMOKE, "--output", str(run), "--gin", "TrainConfig.iterations = 3",
                 "--gin", "TrainConfig.checkpoint_every = 1", "--gin", "TrainConfig.learning_rate = 5e-4",
                 *QUIET]) == 0
    return run


def test_a_resume_keeps_the_overrides_the_run_was_started_with(tmp_path, capsys):
    run = _started(tmp_path)
    capsys.readouterr()
    assert main(["train", SMOKE, "--output", str(run), "--resume", "--gin", "TrainConfig.iterations = 5"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} after iteration 3; changed (recorded in resumes.jsonl):\n" \
           "  TrainConfig.iterations: 3 -> 5\n" in out
    (note,) = read_rows(run / records.RESUMES)
    assert note["iteration"] == 3 and list(note["changed"]) == ["mixgrpo.core.config.TrainConfig.iterations"]
    assert _checkpoints(run) == [f"iter_{k:06d}" for k in range(1, 6)]  # checkpoint_every = 1 kept
    assert _lr(run, 5) == 5e-4  # not the file's 1e-3
    assert "(at iteration 5 of 5; 2 trained now, from iteration 3)" in out


def test_a_resume_from_the_run_directory_alone_or_its_config_gin(tmp_path, capsys):
    run = _started(tmp_path)
    capsys.readouterr()
    assert main(["train", str(run), "--resume", "--gin", "TrainConfig.iterations = 4"]) == 0
    assert "TrainConfig.iterations: 3 -> 4" in capsys.readouterr().out
    assert main(["train", str(run / "config.gin"), "--resume", "--gin", "TrainConfig.iterations = 5"]) == 0
    out = capsys.readouterr().out
    assert "changed (recorded in resumes.jsonl):\n  TrainConfig.iterations: 4 -> 5\n" in out  # nothing else
    assert _lr(run, 5) == 5e-4 and _checkpoints(run)[-1] == "iter_000005"
    assert main(["train", str(run), "--resume"]) == 0  # nothing to do, and it says so
    out = capsys.readouterr().out
    assert f"resuming {run} after iteration 5 with the run's own settings" in out
    assert 'nothing to train: the checkpoint is at iteration 5 and TrainConfig.iterations = 5' in out


def test_a_resume_with_a_new_rate_applies_it_and_prints_it(tmp_path, capsys):
    run = _started(tmp_path)
    capsys.readouterr()
    assert main(["train", str(run), "--resume", "--gin", "TrainConfig.iterations = 4",
                 "--gin", "TrainConfig.learning_rate = 1e-4"]) == 0
    out = capsys.readouterr().out
    assert "  TrainConfig.learning_rate: 0.0005 -> 0.0001\n" in out
    assert _lr(run, 4) == 1e-4
    launch = records.read_launch(run)
    assert launch["gin"][-1] == "TrainConfig.learning_rate = 1e-4"  # a later resume keeps it too


def test_a_changed_experiment_setting_is_still_refused(tmp_path, capsys):
    run = _started(tmp_path)
    before = (run / records.METRICS).read_text()
    assert main(["train", str(run), "--resume", "--gin", "TrainConfig.group_size = 8"]) == 2
    err = capsys.readouterr().err
    assert "change the experiment (TrainConfig.group_size: 4 -> 8)" in err
    assert f"mixgrpo train {run} --resume" in err
    assert (run / records.METRICS).read_text() == before and not (run / records.RESUMES).exists()


def test_a_binding_set_to_its_default_is_no_change():
    from mixgrpo.core.config import parse_gin

    parse_gin([SMOKE])
    key = "mixgrpo.core.config.TrainConfig.ema_decay"
    assert records.diff({}, {key: "None"}) == {}
    assert records.diff({key: "None"}, {}) == {}
    assert records.diff({}, {key: "0.9"}) == {key: (None, "0.9")}
    assert records.format_changes({key: (None, "0.9")}) == ["TrainConfig.ema_decay: (default) -> 0.9"]


def test_resume_without_a_run_is_an_error_that_says_to_drop_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    assert main(["train", SMOKE, "--output", str(empty), "--resume"]) == 2
    assert "nothing to continue: drop --resume" in capsys.readouterr().err
    assert not empty.exists()
    empty.mkdir()
    assert main(["train", str(empty), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err and not any(empty.iterdir())


def test_a_run_directory_without_resume_says_how_to_continue_it(tmp_path, capsys):
    run = _started(tmp_path)
    assert main(["train", str(run)]) == 2
    assert f"continue it with `mixgrpo train {run} --resume`" in capsys.readouterr().err


def _card_commands(card: Path) -> list[str]:
    commands, inside = [], False
    for line in card.read_text().splitlines():
        if line.startswith("```"):
            inside = line == "```bash"
        elif inside and line.startswith("mixgrpo "):
            commands.append(line)
    return commands


def test_every_run_keeps_its_weights_and_the_model_card_commands_run_as_written(tmp_path):
    run = tmp_path / "first"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "mixgrpo"]
    done = subprocess.run([*cli, "train", SMOKE, "--output", str(run)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _checkpoints(run) == ["iter_000003"]  # checkpoint_every = 0: the final one all the same
    commands = _card_commands(run / "README.md")
    verbs = [shlex.split(c)[1] for c in commands]
    assert verbs == ["sample", "eval", "train", "train"], commands
    for command in commands:
        done = subprocess.run([*cli, *shlex.split(command)[1:]], env=env, capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr[-3000:])
    assert len(list((tmp_path / "samples_out").glob("p*_s*.png"))) == 4
    results = json.loads((run / "eval" / "results.json").read_text())
    assert "iter_000003" in json.dumps(results)  # the trained weights were scored, not the base model
    assert _checkpoints(run)[-1] == "iter_000006"  # trained further
    assert _checkpoints(Path(f"{run}-again")) == ["iter_000006"]  # repeated from config.gin


def test_progress_in_a_log_file_is_lines_not_carriage_returns(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "mixgrpo", "train", SMOKE, "--output",
                               str(tmp_path / "run")], env=env, stdout=subprocess.DEVNULL, stderr=f, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("mixgrpo:")]
    assert lines and lines[0].startswith("mixgrpo:   0%") and "3/3" in lines[-1]


def test_help_texts_have_no_rst_markup():
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions:
        texts += [sub.format_help() for sub in action.choices.values()]
    assert texts and not any("``" in t for t in texts)


def test_an_output_directory_that_cannot_be_made_is_named_as_such(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", SMOKE, "--output", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"cannot use {blocker / 'run'} as the run directory (--output, or TrainConfig.output_dir)" in err


@pytest.mark.parametrize("interval", [0.0])
def test_line_progress_writes_whole_lines(interval, tmp_path):
    from mixgrpo.core.progress import LineProgress

    path = tmp_path / "log"
    with open(path, "w") as f:
        bar = LineProgress(total=3, desc="work", file=f, mininterval=interval)
        for _ in range(3):
            bar.set_postfix(x=1, refresh=False)
            bar.update(1)
        bar.close()
    lines = path.read_text().splitlines()
    assert "\r" not in path.read_text()
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%") and "3/3" in lines[-1]


def test_an_experiment_without_a_backbone_is_refused_naming_the_choices(tmp_path, capsys):
    """No model is a sensible default: a method preset alone names no backbone."""
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "experiments" / "methods" / "mixgrpo.gin"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "TrainConfig.backbone is not set" in err and "flux" in err and "include 'backbones/flux.gin'" in err
    assert not out.exists()
