"""``mixgrpo eval`` and ``mixgrpo compare --checkpoint``: held-out numbers equal to training's, written
into the run directory; a grid per prompt whose cells are the checkpoints' images (rows) for each
seed (columns), pixel for pixel; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixgrpo.commands.cli import main
from mixgrpo.commands.export import open_model
from mixgrpo.commands.report import read_metrics
from mixgrpo.commands.side_by_side import RESULTS
from mixgrpo.core.rollout import sample_ode

ROOT = Path(__file__).resolve().parents[2]
TOY = [
    "TrainConfig.iterations = 2", "TrainConfig.checkpoint_every = 1", "TrainConfig.eval_every = 1",
    "TrainConfig.eval_prompts = 3", "TrainConfig.eval_seeds = 2", "TrainConfig.sample_every = 2",
    "TrainConfig.sample_prompts = 3", "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def train(out: Path, *extra: str) -> Path:
    rc = main(["train", str(ROOT / "experiments" / "runs" / "toy_smoke.gin"), "--output", str(out),
               *[a for b in [*TOY, *extra] for a in ("--gin", b)]])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("side_by_side")
    return train(tmp / "a"), train(tmp / "b", "TrainConfig.learning_rate = 3e-3")


def expected_cell(run: Path, checkpoint: str, prompts: list[str], n: int, seed: int, scale: int) -> np.ndarray:
    """Prompt ``n`` with ``seed`` drawn independently (``sample_ode`` keys prompt n by its position), as
    8-bit pixels enlarged ``scale`` times."""
    opened = open_model(run, checkpoint)
    c = opened.config
    from mixgrpo.core.rollout import SamplingSetup

    image = sample_ode(opened.backbone, prompts[: n + 1], [seed] * (n + 1),
                       setup=SamplingSetup(num_steps=c.eval_num_steps or c.num_steps, shift=c.shift, grid=c.grid),
                       solver=opened.pm.create("sampler", c.eval_solver))[n]
    pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return pixels.repeat(scale, 0).repeat(scale, 1)


def check_grids(folder: Path, data: dict, cells: list[tuple[Path, str]]) -> None:
    """Every grid's cell (row r, column j) is checkpoint ``cells[r]``'s image of the grid's prompt
    with seed ``seeds[j]``; rows differ, so a swapped row would fail."""
    prompts = [g["prompt"] for g in data["grids"]]
    for g in data["grids"]:
        png = np.asarray(Image.open(folder / g["file"]).convert("RGB"))
        assert list(png.shape[1::-1]) == g["size"]
        assert len(g["cells"]) == len(cells) and all(len(row) == len(g["seeds"]) for row in g["cells"])
        got = {}
        for r, (run, checkpoint) in enumerate(cells):
            for j, seed in enumerate(g["seeds"]):
                x0, y0, x1, y1 = g["cells"][r][j]
                want = expected_cell(run, checkpoint, prompts, g["prompt_index"], seed, g["scale"])
                got[r, j] = png[y0:y1, x0:x1]
                assert np.array_equal(got[r, j], want), (g["file"], r, j)
        assert not np.array_equal(got[0, 0], got[len(cells) - 1, 0])  # the rows are different models
        assert not np.array_equal(got[0, 0], got[0, 1])  # and the columns different noise


def test_eval_writes_the_run_numbers_and_a_grid_per_prompt(runs, capsys):
    a, _ = runs
    rc, out, err = run_cli(capsys, "eval", a, "--checkpoint", "base", "--checkpoint", "1", "--checkpoint", "latest",
                           "--seeds", "0,5")
    assert rc == 0, err
    folder = a / "eval"
    data = json.loads((folder / RESULTS).read_text())
    rows = {int(r["iteration"]): r for r in read_metrics(a / "metrics.jsonl")}
    assert [c["label"] for c in data["checkpoints"]] == ["base", "iteration 1", "iteration 2"]
    for entry in data["checkpoints"]:  # the numbers training recorded for the same weights
        for key in ("eval/shapes.preference/mean", "eval/shapes.preference/sem"):
            assert entry["metrics"][key] == pytest.approx(rows[entry["iteration"]][key], rel=1e-5), key
        assert len(entry["scores"]["shapes.preference"]) == 3 * 2
    assert data["checkpoints"][0]["metrics"] != data["checkpoints"][2]["metrics"]
    # the default grid prompts are the run's sample-grid prompts, in order
    opened = open_model(a, "base")
    assert [g["prompt"] for g in data["grids"]] == opened.pm.create("prompt_set", "shapes")("eval", 3, 0)
    check_grids(folder, data, [(a, "base"), (a, "1"), (a, "2")])
    report = (folder / "report.md").read_text()
    table = report.index("| checkpoint | iteration |")
    assert table < report.index("## Side by side") < report.index("grid_p0000.png")
    assert "| iteration 2 | 2 |" in report and "| iteration 2 | 2 |" in out
    assert str(folder / "report.md") in out


def test_eval_overwrites_only_with_force(runs, capsys, tmp_path):
    a, _ = runs
    target = tmp_path / "ev"
    assert run_cli(capsys, "eval", a, "--out", target, "--seeds", "0")[0] == 0
    stamp = (target / RESULTS).stat().st_mtime_ns
    rc, _, err = run_cli(capsys, "eval", a, "--out", target, "--checkpoint", "base")
    assert rc == 2 and err.count("\n") == 1 and "--force" in err, err
    assert (target / RESULTS).stat().st_mtime_ns == stamp
    assert run_cli(capsys, "eval", a, "--out", target, "--checkpoint", "base", "--seeds", "0", "--force")[0] == 0
    assert [c["label"] for c in json.loads((target / RESULTS).read_text())["checkpoints"]] == ["base"]


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "7"], "checkpoint '7' not found"),
    (["--checkpoint", "1", "--checkpoint", "iter_000001"], "two rows would be labelled 'iteration 1'"),
    (["--seeds", "x"], "--seeds takes"),
])
def test_eval_errors_are_one_line(runs, capsys, tmp_path, args, message):
    a, _ = runs
    rc, _, err = run_cli(capsys, "eval", a, "--out", tmp_path / "e", *args)
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


def test_compare_checkpoints_of_two_runs(runs, capsys, tmp_path):
    a, b = runs
    rc, out, err = run_cli(capsys, "compare", a, "--checkpoint", "base", "--checkpoint", f"lr 1e-3={a}",
                           "--checkpoint", f"lr 3e-3={b}", "--output", tmp_path / "cmp", "--seeds", "1-2",
                           "--prompts", "a red circle")
    assert rc == 0, err
    data = json.loads((tmp_path / "cmp" / RESULTS).read_text())
    assert [c["label"] for c in data["checkpoints"]] == ["base", "lr 1e-3", "lr 3e-3"]
    final_b = read_metrics(b / "metrics.jsonl")[-1]
    assert data["checkpoints"][2]["metrics"]["eval/shapes.preference/mean"] == pytest.approx(
        final_b["eval/shapes.preference/mean"], rel=1e-5)
    assert [g["prompt"] for g in data["grids"]] == ["a red circle"]
    check_grids(tmp_path / "cmp", data, [(a, "base"), (a, "latest"), (b, "latest")])
    assert "# Comparison of checkpoints" in (tmp_path / "cmp" / "report.md").read_text()
    rc, _, err = run_cli(capsys, "compare", a, "--checkpoint", "base")
    assert rc == 2 and "--output" in err and err.count("\n") == 1


def test_evaluation_shows_progress(runs, capsys, tmp_path):
    a, _ = runs
    rc = main(["eval", str(a), "--out", str(tmp_path / "p"), "--seeds", "0", "--gin", "TrainConfig.progress = True"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "held-out evaluation, 6 images" in err and "checkpoints" in err
