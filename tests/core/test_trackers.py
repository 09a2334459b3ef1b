"""Experiment trackers, read back from what each tracker wrote: TensorBoard's event files (its own
EventAccumulator), wandb's offline transaction log (records parsed with ``wandb.proto``) and trackio's
local database (its own ``SQLiteStorage``). A toy run logs every metrics row, its sample grids and
its config; a resume continues the same tracker runs without a step recorded twice; in a
two-process run only the main process logs; a tracker that is not installed is refused before any
model loads, naming the extra to install."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixgrpo.core import metrics as m
from mixgrpo.core import trackers
from mixgrpo.core.config import TrainConfig, load_config
from mixgrpo.core.records import read_rows
from mixgrpo.core.trainer import Trainer

from .conftest import ROOT, TOY

ALL = "TrainConfig.trackers = ['tensorboard', 'wandb', 'trackio']"
MEAN = m.reward("shapes.preference", "mean")


# -- readers: each tracker's own files ------------------------------------------------------------------------
def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` transaction log. Its framing is LevelDB's log format (a
    7-byte file header ``:W&B``, magic, version; then 32 KiB blocks of chunks, each with a CRC-32 of
    its type and data, a length and a type: 1 whole, 2 first, 3 middle, 4 last); the records are
    ``wandb.proto`` ``Record`` messages. wandb 0.31 dropped its Python reader, so the framing is read
    here and every chunk's checksum is verified."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B", raw[:7]
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if left < 7 or (crc, length, kind) == (0, 0, 0):  # the rest of a block is padding
            pos += left
            continue
        data = raw[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(bytes([kind]) + data), f"bad checksum at byte {pos} of {path}"
        pos, pending = pos + 7 + length, pending + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_runs(out: Path) -> list[dict]:
    """Each offline wandb run under ``out/wandb``: its id, whether it resumed, and its history as
    ``{step: {key: value}}`` (an image's fields as ``<key>/<field>``)."""
    runs = []
    for file in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        run: dict = {"folder": file.parent, "history": {}}
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, resumed=record.run.resume, project=record.run.project,
                           started=(record.run.start_time.seconds, record.run.start_time.nanos),
                           config={u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":
                row = run["history"].setdefault(record.history.step.num, {})
                for item in record.history.item:
                    row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        runs.append(run)
    return sorted(runs, key=lambda r: r["started"])


def tensorboard_events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def trackio_logs(record: dict) -> list[dict]:
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.get_logs(record["project"], record["name"])


def pixels(source) -> np.ndarray:
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


# -- a run with every tracker, stopped between checkpoints and resumed ----------------------------------------
@pytest.fixture(scope="module")
def tracker_env(tmp_path_factory):
    """wandb offline with its caches in a temporary folder; trackio's store in one too (trackio reads
    TRACKIO_DIR once, at import: where it was imported before, its own store is used), and a
    project of this test's own, removed afterwards."""
    home = tmp_path_factory.mktemp("trackers")
    patch = pytest.MonkeyPatch()
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CACHE_DIR": home / "wandb_cache",
                        "WANDB_CONFIG_DIR": home / "wandb_config", "WANDB_DATA_DIR": home / "wandb_data",
                        "TRACKIO_DIR": home / "trackio"}.items():
        patch.setenv(name, str(value))
    import trackio.utils

    store, project = Path(trackio.utils.TRACKIO_DIR), f"mixgrpo-test-{uuid.uuid4().hex[:8]}"
    yield {"project": project, "store": store, "env": dict(os.environ)}
    patch.undo()
    if store != home / "trackio":  # trackio's own store: leave nothing of this test there
        for leftover in store.glob(f"{project}*"):
            leftover.unlink()
        shutil.rmtree(store / "media" / project, ignore_errors=True)


def train(out: Path, project: str, *extra: str, start: str = "new") -> list[dict]:
    cfg, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin",
                          [*TOY, ALL, f"TrainConfig.tracker_project = '{project}'", f"TrainConfig.output_dir = '{out}'",
                           "TrainConfig.checkpoint_every = 2", "TrainConfig.sample_every = 2",
                           "TrainConfig.sample_prompts = 2", *extra])
    return Trainer(cfg, pm).train(start)


@pytest.fixture(scope="module")
def resumed(tracker_env, tmp_path_factory) -> dict:
    """Iterations 1-3 (checkpoints at 2 and 3, grids at 0, 2, 3); the latest checkpoint is then set
    back to 2, as after a stop between checkpoints, and a resume runs 3 again and 4."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    train(out, tracker_env["project"], "TrainConfig.iterations = 3")
    first = json.loads((out / "trackers.json").read_text())
    grid_2 = pixels(out / "samples" / "iter_000002.png")
    (out / "checkpoints" / "latest").write_text("iter_000002")
    time.sleep(1.1)  # TensorBoard orders its event files by the second they were opened
    train(out, tracker_env["project"], "TrainConfig.iterations = 4", start="resume")
    return {"out": out, "first": first, "record": json.loads((out / "trackers.json").read_text()),
            "rows": read_rows(out / "metrics.jsonl"), "grid_2": grid_2}


def test_the_resume_continues_the_recorded_tracker_run(resumed, tracker_env):
    first, record = resumed["first"], resumed["record"]
    assert (record["id"], record["name"]) == (first["id"], first["name"])
    assert record["project"] == tracker_env["project"]
    assert first["steps"] == {"tensorboard": 3, "wandb": 3, "trackio": 3}
    assert record["steps"] == {"tensorboard": 4, "wandb": 4, "trackio": 4}
    assert [r[m.ITERATION] for r in resumed["rows"]] == [0, 1, 2, 3, 4]


def test_tensorboard_purges_the_rerun_steps_and_holds_scalars_grids_and_config(resumed):
    out, rows = resumed["out"], resumed["rows"]
    acc = tensorboard_events(out)
    series = acc.Scalars(MEAN)
    assert [s.step for s in series] == [1, 2, 3, 4]
    assert [s.value for s in series] == pytest.approx([r[MEAN] for r in rows[1:]], rel=1e-6)
    logged = {r[m.ITERATION]: r for r in rows}
    for key in (m.GRAD_NORM, m.WINDOW_START, m.NFE_ROLLOUT):
        assert [s.value for s in acc.Scalars(key)] == pytest.approx([logged[s.step][key] for s in acc.Scalars(key)])
    # the first run's grid of iteration 3 was purged; the resume drew none at 3 and one at 4
    images = acc.Images(trackers.GRID_KEY)
    assert [i.step for i in images] == [0, 2, 4]
    np.testing.assert_array_equal(pixels(io.BytesIO(images[1].encoded_image_string)), resumed["grid_2"])
    np.testing.assert_array_equal(pixels(io.BytesIO(images[2].encoded_image_string)),
                                  pixels(out / "samples" / "iter_000004.png"))
    from tensorboard.util import tensor_util

    (text,) = [t for t in acc.Tensors("config/operative_config/text_summary") if t.step == 0]
    shown = tensor_util.make_ndarray(text.tensor_proto).item().decode()
    assert "TrainConfig.trackers = ['tensorboard', 'wandb', 'trackio']" in shown


def test_wandb_offline_run_is_resumed_by_its_id_without_a_step_twice(resumed):
    out, rows = resumed["out"], resumed["rows"]
    runs = wandb_runs(out)
    assert [(r["id"], r["resumed"]) for r in runs] == [(resumed["record"]["id"], False),
                                                        (resumed["record"]["id"], True)]
    assert runs[0]["project"] == resumed["record"]["project"]
    # steps go forward only: the first run logged 0-3, the resume only 4 (3 was logged before the stop)
    assert sorted(runs[0]["history"]) == [0, 1, 2, 3] and sorted(runs[1]["history"]) == [4]
    history = {**runs[0]["history"], **runs[1]["history"]}
    for row in rows:
        finite = {k: v for k, v in row.items() if k != m.ITERATION and v is not None}
        logged = history[row[m.ITERATION]]
        assert set(finite) <= set(logged), set(finite) - set(logged)
        if row[m.ITERATION] != 3:  # 3 holds the stopped run's numbers (timings differ from the rerun)
            assert {k: logged[k] for k in finite} == pytest.approx(finite, rel=1e-6)
    assert history[3][MEAN] == pytest.approx(rows[3][MEAN], rel=1e-6)  # keyed noise: the rerun's rewards agree
    # the grids: an image at 0, 2, 3 and 4, the PNG kept in the run's media folder
    assert [s for s in sorted(history) if f"{trackers.GRID_KEY}/path" in history[s]] == [0, 2, 3, 4]
    media = runs[0]["folder"] / "files" / history[2][f"{trackers.GRID_KEY}/path"]
    np.testing.assert_array_equal(pixels(media), resumed["grid_2"])
    # the config: each start gives the run's config as it then is (the resume raised the iterations)
    assert "TrainConfig.iterations = 3" in runs[0]["config"]["operative_config"]
    config = runs[1]["config"]
    assert config["operative_config"] == (out / "config.gin").read_text()
    assert config["bindings"] == json.loads((out / "bindings.json").read_text())
    assert config["bindings"]["mixgrpo.core.config.TrainConfig.iterations"] == "4"


def test_trackio_resumes_its_run_by_name_and_holds_every_step_once(resumed, tracker_env):
    from trackio.sqlite_storage import SQLiteStorage

    rows, record = resumed["rows"], resumed["record"]
    logs = trackio_logs(record)
    scalars = [(entry["step"], entry[MEAN]) for entry in logs if MEAN in entry]
    assert [s for s, _ in scalars] == [1, 2, 3, 4]
    expected = {r[m.ITERATION]: r.get(MEAN) for r in rows}
    assert [v for _, v in scalars] == pytest.approx([expected[s] for s, _ in scalars], rel=1e-6)
    keys = set().union(*(entry.keys() for entry in logs if entry["step"] == 1))
    assert {k for k, v in rows[1].items() if v is not None} - {m.ITERATION} <= keys
    grids = {entry["step"]: entry[trackers.GRID_KEY] for entry in logs if trackers.GRID_KEY in entry}
    assert sorted(grids) == [0, 2, 3, 4]
    stored = tracker_env["store"] / "media" / grids[2]["file_path"]
    np.testing.assert_array_equal(pixels(stored), resumed["grid_2"])
    assert len([r for r in SQLiteStorage.get_run_records(record["project"]) if r["name"] == record["name"]]) == 1
    config = SQLiteStorage.get_run_config(record["project"], record["name"])
    assert config["operative_config"] == (resumed["out"] / "config.gin").read_text()


# -- selection and the checks before any model loads ----------------------------------------------------------
def test_trackers_are_chosen_in_gin_and_the_deprecated_tensorboard_still_works():
    assert trackers.selected(TrainConfig(trackers=["wandb", "trackio", "wandb"])) == ("wandb", "trackio")
    assert trackers.selected(TrainConfig(trackers=[])) == ()
    assert trackers.selected(TrainConfig(trackers="wandb")) == ("wandb",)
    assert trackers.selected(TrainConfig(trackers=["wandb"], tensorboard=True)) == ("wandb", "tensorboard")
    assert trackers.selected(TrainConfig(trackers=["tensorboard", "wandb"], tensorboard=False)) == ("wandb",)
    assert trackers.selected(TrainConfig(tensorboard=False)) == ()
    installed = importlib.util.find_spec("tensorboard") is not None
    assert trackers.selected(TrainConfig()) == (("tensorboard",) if installed else ())


@pytest.mark.parametrize(("bindings", "message"), [
    (["TrainConfig.trackers = ['wandb']"], r"wandb package is not installed: pip install 'mixgrpo\[wandb\]'"),
    (["TrainConfig.trackers = ['tensorboard', 'trackio']"], r"pip install 'mixgrpo\[trackio\]'"),
    (["TrainConfig.trackers = ['mlflow']"], r"'mlflow', which is not a tracker .*tensorboard, wandb, trackio"),
    (["TrainConfig.trackers = 3"], r"a list of tracker names"),
    (["TrainConfig.trackers = ['wandb']", "TrainConfig.tracker_project = ''"], r"tracker_project = ''"),
])
def test_a_missing_or_unknown_tracker_is_refused_before_any_model_loads(tmp_path, monkeypatch, bindings, message):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "trackio") else real(name, *a))
    cfg, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin",
                          [*TOY, f"TrainConfig.output_dir = '{tmp_path / 'run'}'", *bindings])
    built = []
    create = pm.create
    monkeypatch.setattr(pm, "create", lambda kind, *a, **k: built.append(kind) or create(kind, *a, **k))
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, pm)
    assert built == [] and not (tmp_path / "run").exists()  # nothing built, nothing written


# -- two processes: the main one logs, the other logs nothing -------------------------------------------------
def test_in_a_two_process_run_only_the_main_process_logs(tmp_path, tracker_env):
    out, project = tmp_path / "run", tracker_env["project"] + "-ddp"
    bindings = [*TOY, ALL, f"TrainConfig.tracker_project = '{project}'", "TrainConfig.iterations = 2",
                "TrainConfig.sample_every = 2", "TrainConfig.sample_prompts = 2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--no-python", str(Path(sys.executable).with_name("mixgrpo")), "train",
           str(ROOT / "experiments" / "methods" / "mixgrpo.gin"), *sum((["--gin", b] for b in bindings), []),
           "--output", str(out)]
    env = dict(tracker_env["env"], HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRACKIO_DIR=str(tracker_env["store"]))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "trackers.json").read_text())
    assert record["steps"] == {"tensorboard": 2, "wandb": 2, "trackio": 2}
    (run,) = wandb_runs(out)  # one wandb run, not one per process
    assert sorted(run["history"]) == [0, 1, 2] and run["id"] == record["id"]
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    assert [s.step for s in tensorboard_events(out).Scalars(MEAN)] == [1, 2]
    from trackio.sqlite_storage import SQLiteStorage

    assert [r["name"] for r in SQLiteStorage.get_run_records(project)] == [record["name"]]
    assert [e["step"] for e in trackio_logs(record) if MEAN in e] == [1, 2]
    for leftover in tracker_env["store"].glob(f"{project}*"):  # the module fixture cleans only its project
        leftover.unlink()
    shutil.rmtree(tracker_env["store"] / "media" / project, ignore_errors=True)
