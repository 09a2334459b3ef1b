"""Run records stay honest: existing runs are not overwritten by accident, resumes refuse a changed
experiment and record allowed changes, no iteration is recorded twice, old checkpoints are pruned,
failing rewards are masked and counted, and nothing pickled is ever loaded."""

from __future__ import annotations

import json
import pickle
import time

import pytest
import torch

from mixgrpo.core import checkpoint as ckpt
from mixgrpo.core.records import RunDirectoryError, read_rows
from mixgrpo.core.scoring import RewardFailure
from mixgrpo.core.trainer import Trainer

BASE = ["TrainConfig.checkpoint_every = 2", "TrainConfig.tensorboard = True"]


def run(toy_config, tmp_path, *extra, resume=False, overwrite=False, method="mixgrpo"):
    cfg, pm = toy_config(method, *BASE, f"TrainConfig.output_dir = '{tmp_path / 'run'}'", *extra)
    trainer = Trainer(cfg, pm)
    trainer.train("resume" if resume else "overwrite" if overwrite else "new")
    return trainer


def test_a_run_directory_is_not_overwritten_by_accident(toy_config, tmp_path):
    run(toy_config, tmp_path, "TrainConfig.iterations = 2")
    with pytest.raises(RunDirectoryError, match="already holds a run .*--resume.*--overwrite"):
        run(toy_config, tmp_path, "TrainConfig.iterations = 2")
    run(toy_config, tmp_path, "TrainConfig.iterations = 1", "TrainConfig.checkpoint_every = 1", overwrite=True)
    assert [r["iteration"] for r in read_rows(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("iter_*")) == ["iter_000001"]


def test_resume_refuses_a_changed_experiment_and_names_the_bindings(toy_config, tmp_path):
    run(toy_config, tmp_path, "TrainConfig.iterations = 2")
    with pytest.raises(RunDirectoryError, match=r"group_size: 3 -> 4.*FlowSDE.noise_level: 0.7 -> 0.5"):
        run(toy_config, tmp_path, "TrainConfig.iterations = 4", "TrainConfig.group_size = 4",
            "FlowSDE.noise_level = 0.5", resume=True)
    assert [r["iteration"] for r in read_rows(tmp_path / "run" / "metrics.jsonl")] == [1, 2]  # nothing touched


def test_resume_applies_and_records_a_new_learning_rate(toy_config, tmp_path):
    run(toy_config, tmp_path, "TrainConfig.iterations = 2")
    trainer = run(toy_config, tmp_path, "TrainConfig.iterations = 3", "TrainConfig.learning_rate = 5e-4",
                  resume=True)
    assert trainer.optimizer.param_groups[0]["lr"] == 5e-4
    (note,) = read_rows(tmp_path / "run" / "resumes.jsonl")
    assert note["iteration"] == 2
    assert any(k.endswith("TrainConfig.learning_rate") and v == ["0.001", "0.0005"] for k, v in note["changed"].items())
    assert "TrainConfig.learning_rate = 0.0005" in (tmp_path / "run" / "config.gin").read_text()


def test_no_iteration_is_recorded_twice_after_a_stop_between_checkpoints(toy_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(toy_config, tmp_path, "TrainConfig.iterations = 3", "TrainConfig.checkpoint_every = 2",
        "TrainConfig.eval_every = 1", "TrainConfig.eval_prompts = 2", "TrainConfig.eval_seeds = 1")
    # the run stopped after iteration 3, its last checkpoint is at 2; going on repeats iteration 3
    pointer = tmp_path / "run" / "checkpoints" / "latest"
    pointer.write_text("iter_000002")
    # TensorBoard orders event files by name, which starts with the second they were opened: a real
    # resume happens later than that (within one second and one process the names can sort otherwise)
    time.sleep(1.1)
    run(toy_config, tmp_path, "TrainConfig.iterations = 5", "TrainConfig.checkpoint_every = 2",
        "TrainConfig.eval_every = 1", "TrainConfig.eval_prompts = 2", "TrainConfig.eval_seeds = 1", resume=True)
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4, 5]
    scored = [r["iteration"] for r in read_rows(tmp_path / "run" / "eval_scores.jsonl")]
    assert scored == [0, 1, 2, 3, 4, 5]
    accumulator = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    for folder in sorted((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(folder.parent))
    accumulator.Reload()
    steps = [s.step for s in accumulator.Scalars("reward/shapes.preference/mean")]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_past_the_end_says_why_nothing_trains(toy_config, tmp_path, capsys):
    from mixgrpo.commands.cli import main
    from tests.core.conftest import ROOT, TOY

    args = ["train", str(ROOT / "experiments" / "methods" / "mixgrpo.gin"), "--output", str(tmp_path / "run"),
            *sum((["--gin", b] for b in [*TOY, "TrainConfig.iterations = 2", "TrainConfig.checkpoint_every = 1"]), [])]
    assert main(args) == 0
    assert main([*args, "--gin", "TrainConfig.iterations = 1", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the checkpoint is at iteration 2 and TrainConfig.iterations = 1" in out


def test_keep_last_prunes_old_checkpoints_but_never_the_latest(toy_config, tmp_path):
    run(toy_config, tmp_path, "TrainConfig.iterations = 5", "TrainConfig.checkpoint_every = 1",
        "TrainConfig.keep_last = 2")
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_000004", "iter_000005"]
    assert ckpt.latest(root).name == "iter_000005"
    (root / "latest").write_text("iter_000004")  # whatever latest points to survives a prune
    ckpt.prune(root, 1)
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_000004", "iter_000005"]
    (root / "latest").write_text("iter_000005")
    ckpt.prune(root, 1)
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_000005"]


# -- rewards that fail -------------------------------------------------------------------------------------
FAILURES = {
    "exception": lambda images, prompts: (_ for _ in ()).throw(ConnectionError("reward server restarted")),
    "nan": lambda images, prompts: torch.full((len(prompts),), float("nan")),
    "inf": lambda images, prompts: torch.full((len(prompts),), float("inf")),
    "wrong length": lambda images, prompts: torch.zeros(len(prompts) + 1),
    "wrong dtype": lambda images, prompts: torch.zeros(len(prompts), dtype=torch.bool),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_a_failing_reward_is_masked_counted_and_stops_the_run_when_it_persists(toy_config, tmp_path, kind):
    cfg, pm = toy_config("mixgrpo", "TrainConfig.iterations = 5", "TrainConfig.max_failed_iterations = 2",
                         f"TrainConfig.output_dir = '{tmp_path / 'run'}'")
    trainer = Trainer(cfg, pm)
    reward = trainer.rewards["shapes.preference"]
    real, broken = reward.__call__, FAILURES[kind]
    n = cfg.prompts_per_iteration * cfg.group_size
    scored = []  # samples per reward call (one call per rollout chunk)

    def flaky(images, prompts):  # iteration 1 scores (NaN/Inf: its first 3 samples), iterations 2 and 3 fail
        first = not scored
        scored.append(len(prompts))
        if sum(scored) > n:
            return broken(images, prompts)
        scores = real(images, prompts)
        return torch.cat([broken(images, prompts[:3]), scores[3:]]) if kind in ("nan", "inf") and first else scores

    type(reward).__call__ = lambda self, images, prompts: flaky(images, prompts)
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    try:
        with pytest.warns(RuntimeWarning, match="masked out of the group statistics"):
            with pytest.raises(RewardFailure, match="scored no sample in 2 consecutive iterations") as err:
                trainer.train()
    finally:
        type(reward).__call__ = real.__func__
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    expected_first = 3 if kind in ("nan", "inf") else 0
    assert [r["reward/shapes.preference/failed"] for r in rows] == [expected_first, n, n]  # logged, then stopped
    assert rows[1]["policy/skipped_steps"] == rows[2]["policy/skipped_steps"] == cfg.num_minibatches
    if kind == "exception":
        assert isinstance(err.value.__cause__, ConnectionError)  # the reward's own error
    assert any(not torch.equal(a, b) for a, b in zip(trainer.backbone.trainable_parameters(), before))


# -- nothing pickled is loaded ------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(MARKER),))


MARKER = ""


def test_a_crafted_pickle_in_a_checkpoint_is_refused(toy_config, tmp_path):
    global MARKER
    trainer = run(toy_config, tmp_path, "TrainConfig.iterations = 2")
    folder = tmp_path / "run" / "checkpoints" / "iter_000002"
    MARKER = str(tmp_path / "pwned")
    for name in ("model.safetensors", "optimizer.safetensors"):
        (folder / name).write_bytes(pickle.dumps(_Payload()))
        with pytest.raises(Exception) as err:
            ckpt.resume(trainer, tmp_path / "run" / "checkpoints")
        assert "safetensors" in f"{type(err.value).__module__} {err.value}".lower() or "header" in str(err.value)
        assert not (tmp_path / "pwned").exists()
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["format"] == ckpt.FORMAT


def test_a_checkpoint_of_the_older_format_is_refused_with_a_message(toy_config, tmp_path, capsys):
    from mixgrpo.commands.cli import main
    from tests.core.conftest import ROOT, TOY

    old = tmp_path / "run" / "checkpoints" / "iter_000001"  # what accelerate's save_state wrote before
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text(json.dumps({"iteration": 1, "seed": 0, "objective": "mixgrpo"}))
    (old / "optimizer.bin").write_bytes(pickle.dumps({"state": {}}))
    (old.parent / "latest").write_text(old.name)
    args = ["train", str(ROOT / "experiments" / "methods" / "mixgrpo.gin"), "--output", str(tmp_path / "run"),
            *sum((["--gin", b] for b in TOY), []), "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has format 1, this mixgrpo reads format 2" in err and "Traceback" not in err
