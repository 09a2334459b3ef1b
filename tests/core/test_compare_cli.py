"""``mixgrpo compare`` as a user types it: refusals before anything trains (a plain experiment file,
no held-out evaluation), the compare file's own bindings applied to every run, a row per training
seed with the gain's spread over seeds, numbers printed with significant digits, and a report that
never fails on what it reads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixgrpo.commands.cli import main
from mixgrpo.commands.compare import _variant_arg
from mixgrpo.commands.compare_report import format_at, format_estimate, summarize, write_report
from mixgrpo.core import metrics

from .test_compare import EXP, ROOT, WORLD, printed_close, table_cells

# the comparison tests' toy world without held-out evaluation, sample grids or checkpoints: the
# compare file or the command line decides the evaluation
BARE_WORLD = "".join(line + "\n" for line in WORLD.splitlines()
                     if not line.startswith(("TrainConfig.eval_every", "TrainConfig.sample", "TrainConfig.checkpoint")))
BARE_WORLD += "TrainConfig.sample_every = 0\nTrainConfig.checkpoint_every = 0\nTrainConfig.tensorboard = False\n"
KEY = "shapes.preference"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def compare_file(tmp: Path, *lines: str, seeds: str = "(0, 1)", variants: str | None = None) -> Path:
    (tmp / "world.gin").write_text(BARE_WORLD)
    variants = variants or (f"{{'Dance': '{EXP / 'methods/dancegrpo.gin'}', "
                            f"'Mix w=1': ['{EXP / 'methods/mixgrpo.gin'}', 'ProgressiveWindow.window_size = 1']}}")
    path = tmp / "compare.gin"
    path.write_text("\n".join([f"CompareConfig.base = '{tmp / 'world.gin'}'", f"CompareConfig.variants = {variants}",
                               f"CompareConfig.seeds = {seeds}", *lines]) + "\n")
    return path


# -- (a) a plain experiment file ------------------------------------------------------------------

def test_a_plain_experiment_file_is_refused_with_the_fix_and_no_traceback(tmp_path):
    """The README's toy smoke run given to compare: exit 2, one paragraph naming CompareConfig, the
    example compare file and `mixgrpo train`; nothing written."""
    cmd = [sys.executable, "-m", "mixgrpo", "compare", "experiments/runs/toy_smoke.gin",
           "--output", str(tmp_path / "x")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2, (done.stdout, done.stderr)
    err = done.stderr
    assert "Traceback" not in err and "RuntimeError" not in err, err
    assert err.startswith("mixgrpo compare: error: experiments/runs/toy_smoke.gin is not a compare file"), err
    for needed in ("CompareConfig.base", "CompareConfig.variants", "experiments/shapes/compare.gin",
                   "mixgrpo train experiments/runs/toy_smoke.gin"):
        assert needed in err, (needed, err)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("lines, expected", [
    (["CompareConfig.variants = {'a': 'methods/mixgrpo.gin'}"],
     "binds CompareConfig.variants but not CompareConfig.base"),
    (["CompareConfig.base = 'shapes/world.gin'"], "binds CompareConfig.base but not CompareConfig.variants"),
    (["CompareConfig.base = 'shapes/world.gin'", "CompareConfig.variants = 'methods/mixgrpo.gin'"],
     "CompareConfig.variants = 'methods/mixgrpo.gin': a dict"),
    (["CompareConfig.base = 'shapes/world.gin'", "CompareConfig.variants = {'a': 3}"],
     r"CompareConfig.variants['a'] = 3: a variant is a gin file"),
    (["CompareConfig.base = 'shapes/world.gin'", "CompareConfig.variants = {'a': 'methods/mixgrpo.gin'}",
      "CompareConfig.seeds = 0"], "CompareConfig.seeds = 0: a tuple of distinct integer training seeds"),
    (["CompareConfig.base = 'shapes/world.gin'", "CompareConfig.variants = {'a': 'methods/mixgrpo.gin'}",
      "CompareConfig.seeds = (1, 1)"], "CompareConfig.seeds = (1, 1)"),
])
def test_a_compare_file_that_binds_too_little_or_the_wrong_types_is_refused(capsys, tmp_path, lines, expected):
    (tmp_path / "c.gin").write_text("\n".join(lines) + "\n")
    rc, out, err = run_cli(capsys, "compare", tmp_path / "c.gin", "--output", tmp_path / "out")
    assert rc == 2 and err.startswith("mixgrpo compare: error:"), err
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_a_base_and_command_line_variants_need_no_variants_binding(capsys, tmp_path):
    """--variant replaces CompareConfig.variants, so a compare file may bind only the base; the name
    may hold '=' (docs/tutorial.md's `G=4=methods/mixgrpo.gin;...`)."""
    assert _variant_arg("G=4=methods/mixgrpo.gin;TrainConfig.group_size = 4") == (
        "G=4", ["methods/mixgrpo.gin", "TrainConfig.group_size = 4"])
    assert _variant_arg("w3=TrainConfig.schedule = 'fixed';FixedWindow.window_size = 3") == (
        "w3", ["TrainConfig.schedule = 'fixed'", "FixedWindow.window_size = 3"])
    assert _variant_arg("euler=methods/mixgrpo_flash.gin") == ("euler", ["methods/mixgrpo_flash.gin"])
    (tmp_path / "world.gin").write_text(BARE_WORLD)
    (tmp_path / "c.gin").write_text(f"CompareConfig.base = '{tmp_path / 'world.gin'}'\n")
    rc, out, err = run_cli(capsys, "compare", tmp_path / "c.gin", "--output", tmp_path / "out",
                           "--variant", f"lr=2e-3={EXP / 'methods/mixgrpo.gin'};TrainConfig.learning_rate = 2e-3",
                           "--gin", "TrainConfig.iterations = 1", "--gin", "TrainConfig.eval_every = 1",
                           "--gin", "CompareConfig.seeds = (0,)")
    assert rc == 0, err
    assert (tmp_path / "out" / "lr_2e-3" / "seed_0" / "done.json").is_file()
    assert "TrainConfig.learning_rate = 0.002" in (tmp_path / "out" / "lr_2e-3" / "seed_0" / "config.gin").read_text()


# -- (c) no held-out evaluation -------------------------------------------------------------------

def test_a_comparison_without_evaluation_is_refused_before_any_run(capsys, tmp_path):
    path = compare_file(tmp_path, "TrainConfig.iterations = 3")
    rc, out, err = run_cli(capsys, "compare", path, "--output", tmp_path / "out")
    assert rc == 2, (out, err)
    assert "no held-out evaluation in 'Dance', 'Mix w=1' (TrainConfig.eval_every = 0)" in err, err
    assert '--gin "TrainConfig.eval_every = 3"' in err and str(path) in err and "nothing was trained" in err
    assert not (tmp_path / "out").exists(), "refused before any run directory is created"
    assert "every run takes compare.gin's own bindings" in out and "TrainConfig.iterations = 3" in out


def test_one_variant_without_evaluation_or_an_unevaluated_metric_is_refused_by_name(capsys, tmp_path):
    variants = (f"{{'Dance': '{EXP / 'methods/dancegrpo.gin'}', "
                f"'quiet': ['{EXP / 'methods/mixgrpo.gin'}', 'TrainConfig.eval_every = 0']}}")
    path = compare_file(tmp_path, "TrainConfig.eval_every = 2", variants=variants)
    rc, _, err = run_cli(capsys, "compare", path, "--output", tmp_path / "out")
    assert rc == 2 and "no held-out evaluation in 'quiet' (TrainConfig.eval_every = 0)" in err, err
    rc, _, err = run_cli(capsys, "compare", path, "--output", tmp_path / "out", "--gin",
                         "CompareConfig.metric = 'shapes.composition'", "--gin", "TrainConfig.eval_every = 1")
    assert rc == 2 and "'shapes.composition' (CompareConfig.metric) is not evaluated by 'Dance', 'quiet'" in err, err
    assert "TrainConfig.eval_rewards" in err
    assert not (tmp_path / "out").exists()


# -- (b) the compare file's bindings, several training seeds --------------------------------------

@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Two variants × two training seeds; the compare file evaluates (the base file does not) and
    binds what the precedence test reads; the command line overrides one of its lines."""
    tmp = tmp_path_factory.mktemp("seeded")
    path = compare_file(tmp, "TrainConfig.eval_every = 2", "TrainConfig.iterations = 3",
                        "TrainConfig.eval_prompts = 4",  # the command line's 2 wins
                        "DanceSDE.noise_level = 0.5",  # wins over dancegrpo.gin's 0.3 (a variant file)
                        "ProgressiveWindow.window_size = 3")  # loses to the variant's own binding (1)
    rc = main(["compare", str(path), "--output", str(tmp / "out"), "--gin", "TrainConfig.eval_prompts = 2"])
    assert rc == 0
    return tmp / "out"


def _eval_scores(run: Path) -> dict[int, np.ndarray]:
    lines = [json.loads(x) for x in (run / "eval_scores.jsonl").read_text().splitlines() if x.strip()]
    return {x["iteration"]: np.asarray(x[KEY], dtype=np.float64) for x in lines}


def test_the_compare_files_bindings_apply_to_every_run_in_order(seeded):
    for folder in ("Dance", "Mix_w_1"):
        for seed in (0, 1):
            run = seeded / folder / f"seed_{seed}"
            config = (run / "config.gin").read_text()
            assert "TrainConfig.eval_every = 2" in config and "TrainConfig.iterations = 3" in config
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            assert [r["iteration"] for r in rows if f"eval/{KEY}/mean" in r] == [0, 2, 3]  # evaluations happened
            scores = _eval_scores(run)
            assert sorted(scores) == [0, 2, 3] and all(s.size == 2 * 2 for s in scores.values())  # --gin wins
            assert "CompareConfig" not in (run / "bindings.json").read_text()
    assert "DanceSDE.noise_level = 0.5" in (seeded / "Dance" / "seed_0" / "config.gin").read_text()
    mix = [json.loads(x) for x in (seeded / "Mix_w_1" / "seed_1" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["window/size"] == 1 for r in mix[1:])


def test_several_seeds_give_a_row_per_seed_and_the_gain_spread_over_seeds(seeded):
    """Re-derived from the runs' per-image scores: each seed's gain (mean final − mean base image
    score) and their mean ± standard deviation / √2, against report.md and results.json."""
    text = (seeded / "report.md").read_text()
    data = json.loads((seeded / "results.json").read_text())
    for label, folder in (("Dance", "Dance"), ("Mix w=1", "Mix_w_1")):
        gains = []
        for seed in (0, 1):
            scores = _eval_scores(seeded / folder / f"seed_{seed}")
            gain = np.nanmean(scores[3]) - np.nanmean(scores[0])
            gains.append(gain)
            row = table_cells(text, "| variant | base |", f"| {label} · seed {seed} |")
            assert printed_close(row["gain"], gain), (row, gain)
            assert printed_close(row["final"].split(" ± ")[0], np.nanmean(scores[3]))
            (record,) = [s for s in data["variants"][label]["seeds"] if s["seed"] == seed]
            assert record["run"] == f"{folder}/seed_{seed}" and record["evaluations"] == 3
            assert record["gain"] == pytest.approx(gain, rel=1e-4, abs=1e-12)
        spread = np.std(gains, ddof=1) / math.sqrt(2)
        cell = table_cells(text, "| variant | base |", f"| {label} |")["gain ± SE over seeds"]
        assert cell.endswith("(2 seeds)"), cell
        mean_text, sem_text = cell.removesuffix("(2 seeds)").split(" ± ")
        assert printed_close(mean_text, np.mean(gains)) and printed_close(sem_text, spread), (cell, gains)
        over = data["variants"][label]["gain_over_seeds"]
        assert over["seeds"] == 2 and over["mean"] == pytest.approx(np.mean(gains), rel=1e-4, abs=1e-12)
        assert over["sem"] == pytest.approx(spread, rel=1e-4, abs=1e-12)
        # beside the paired per-image SE, with its z
        gain_row = table_cells(text, "| variant | gain |", f"| {label} |")
        assert gain_row["gain ± SE over seeds"] == cell and gain_row["paired gain ± SE"] != "n/a"
        assert float(gain_row["z over seeds"]) == pytest.approx(np.mean(gains) / spread, abs=0.06)
    assert (seeded / "reward_curves.png").stat().st_size > 10_000


# -- (d) significant digits; a report that never fails on what it reads ---------------------------

def test_tiny_values_print_with_significant_digits():
    assert format_estimate(2.3e-5, 1.1e-6) == "2.30e-05 ± 1.1e-06"
    assert format_estimate(-1.3e-5, 4.4e-6, signed=True) == "-1.30e-05 ± 4.4e-06"
    assert format_estimate(4.4e-6, 1.2e-7, signed=True) == "+4.40e-06 ± 1.2e-07"
    assert format_estimate(0.4412345, 1.2e-6) == "0.4412345 ± 1.2e-06"  # the mean keeps the digits its SE supports
    assert format_estimate(0.439, 0.008) == "0.4390 ± 0.0080"  # the demo's precision, as before
    assert format_estimate(0.4412, 0.0102) == "0.441 ± 0.010"
    assert format_estimate(12.34, 1.5) == "12.3 ± 1.5"
    assert format_estimate(1.234e-5, None) == "1.234e-05" and format_estimate(float("nan"), 0.1) == "n/a"
    assert format_at(2.34e-7, 1.1e-6, signed=True) == "+2.3e-07" and format_at(0.01, 0.008, signed=True) == "+0.0100"


def _write_run(run: Path, evals: list[tuple[int, float, float]], iterations: int = 2, truncated: bool = False):
    run.mkdir(parents=True)
    rows = []
    for k in range(iterations + 1):
        row = {metrics.ITERATION: k}
        if k:
            row.update({metrics.ITERATION_S: 1.5, metrics.ROLLOUT_S: 1.0, metrics.TRAIN_S: 0.4,
                        metrics.NFE_ROLLOUT: 6.0, metrics.NFE_TRAIN: 2.0})
        for it, m, se in evals:
            if it == k:
                row.update({metrics.evaluation(KEY, "mean"): m, metrics.evaluation(KEY, "sem"): se})
        rows.append(json.dumps(row))
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n" + ('{"iteration": 3, "perf/it' if truncated else ""))


def test_a_report_of_tiny_rewards_prints_them_with_significant_digits(tmp_path):
    """One seed: the table keeps today's columns; 1e-5 rewards print as such, never 0.0000 ± 0.0000."""
    _write_run(tmp_path / "A" / "seed_0", [(0, 1.23e-5, 2.1e-6), (2, 1.87e-5, 2.4e-6)])
    report = write_report(tmp_path, {"A": [tmp_path / "A" / "seed_0"]}, metric=KEY)
    text = report.read_text()
    assert "| variant | base | final | gain | s / iteration | rollout s | train s | NFE rollout | NFE train " \
           "| wall-clock s |" in text
    assert "· seed" not in text and "over seeds" not in text
    assert "| A | 1.23e-05 ± 2.1e-06 | 1.87e-05 ± 2.4e-06 | +6.4e-06 | 1.50 | 1.00 | 0.40 | 6.0 | 2.0 | 3 |" in text
    assert "0.0000" not in text
    cells = table_cells(text, "| variant | gain |", "| A |")
    assert cells["gain / SE of the curve"] == "+2.7" and cells["paired gain ± SE"] == "n/a"  # no per-image scores


def test_the_report_reads_runs_without_evaluations_missing_runs_and_cut_lines(tmp_path):
    """No IndexError from any input: a variant whose seed 1 never ran and whose seed 0 was cut
    mid-line, a variant with no evaluation, a variant with no run at all."""
    _write_run(tmp_path / "A" / "seed_0", [(0, 0.40, 0.01), (2, 0.46, 0.01)], truncated=True)
    _write_run(tmp_path / "B" / "seed_0", [])
    _write_run(tmp_path / "B" / "seed_1", [])
    runs = {"A": [tmp_path / "A" / "seed_0", tmp_path / "A" / "seed_1"],
            "B": [tmp_path / "B" / "seed_0", tmp_path / "B" / "seed_1"], "C": [tmp_path / "C" / "seed_0"]}
    text = write_report(tmp_path, runs).read_text()  # the metric: the one reward any run evaluated
    assert "`shapes.preference`" in text
    assert table_cells(text, "| variant | base |", "| A |")["final"] == "0.460 ± 0.010"
    assert table_cells(text, "| variant | base |", "| A · seed 1 |")["final"] == "no records"
    assert table_cells(text, "| variant | base |", "| A |")["gain ± SE over seeds"] == "n/a"  # one seed evaluated
    b = table_cells(text, "| variant | base |", "| B |")
    assert b["base"] == b["final"] == b["gain"] == "n/a" and b["s / iteration"] == "1.50"
    assert "| C |" not in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["variants"]["B"]["final"] is None and [s["records"] for s in data["variants"]["A"]["seeds"]] == [
        True, False]
    _, table = summarize({"B": runs["B"]})
    assert table["B"]["final"] is None and table["B"]["seed_gain"] is None
    with pytest.raises(ValueError, match="no runs with records"):
        write_report(tmp_path / "empty", {"C": runs["C"]})
    _write_run(tmp_path / "D" / "seed_0", [])
    text = write_report(tmp_path / "none", {"D": [tmp_path / "D" / "seed_0"]}).read_text()
    assert "No run holds a held-out evaluation" in text
