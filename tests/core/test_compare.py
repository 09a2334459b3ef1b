"""``mixgrpo compare``: variants on the same prompts, seeds and budget; the report; resuming."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixgrpo.commands.compare import run_compare
from mixgrpo.commands.compare_report import predicted_ratios, summarize
from mixgrpo.commands.report import read_metrics, samples_per_iteration
from mixgrpo.core.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
EXP = ROOT / "experiments"

WORLD = f"""# a toy world for the comparison tests (sizes for speed only)
include '{EXP / 'backbones/toy.gin'}'
TrainConfig.num_steps = 6
TrainConfig.group_size = 3
TrainConfig.prompts_per_iteration = 2
TrainConfig.rollout_batch_size = 6
TrainConfig.micro_batch_size = 6
TrainConfig.iterations = 2
TrainConfig.learning_rate = 1e-3
TrainConfig.progress = False
TrainConfig.rewards = {{'shapes.preference': 1.0}}
TrainConfig.eval_every = 1
TrainConfig.eval_prompts = 3
TrainConfig.eval_seeds = 2
TrainConfig.sample_every = 2
TrainConfig.sample_prompts = 2
TrainConfig.checkpoint_every = 2
ProgressiveWindow.window_size = 2
FixedWindow.window_size = 2
"""


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    (tmp / "world.gin").write_text(WORLD)
    (tmp / "compare.gin").write_text(
        "# two methods and one swapped component\n"
        f"CompareConfig.base = '{tmp / 'world.gin'}'\n"
        "CompareConfig.variants = {\n"
        f"    'DanceGRPO': '{EXP / 'methods/dancegrpo.gin'}',\n"
        f"    'MixGRPO': '{EXP / 'methods/mixgrpo.gin'}',\n"
        f"    'MixGRPO w=1': ['{EXP / 'methods/mixgrpo.gin'}', 'ProgressiveWindow.window_size = 1'],\n"
        "}\n"
        "CompareConfig.seeds = (0, 1)\n"
        f"CompareConfig.output_dir = '{tmp / 'out'}'\n")
    report = run_compare(tmp / "compare.gin")
    return tmp, report


def printed_close(text: str, value: float) -> bool:
    """Whether a number printed in a report (``0.4410``, ``+2.30e-05``) is ``value`` to the digits shown
    (one unit of its last digit, for float32 against float64 rounding)."""
    from decimal import Decimal

    unit = float(Decimal(1).scaleb(Decimal(text.strip().lstrip("+")).as_tuple().exponent))
    return abs(float(text) - value) <= unit * 1.0001


def table_cells(text: str, header_start: str, row_start: str) -> dict[str, str]:
    """The cells of the row that starts with ``row_start`` in the table whose header starts with
    ``header_start``, by column name."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    names = [c.strip() for c in lines[top].strip("|").split("|")]
    for line in lines[top + 2:]:
        if not line.startswith("|"):
            break
        if line.startswith(row_start):
            return dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
    raise AssertionError(f"no row {row_start!r} in the table {header_start!r}")


def _rows(out, label, seed):
    return read_metrics(out / label.replace(" ", "_").replace("=", "_") / f"seed_{seed}" / "metrics.jsonl")


def test_every_variant_and_seed_ran_with_the_same_prompts(comparison):
    tmp, _ = comparison
    out = tmp / "out"
    for label in ("DanceGRPO", "MixGRPO", "MixGRPO_w_1"):
        for seed in (0, 1):
            rows = read_metrics(out / label / f"seed_{seed}" / "metrics.jsonl")
            assert [r["iteration"] for r in rows] == [0, 1, 2]
            assert (out / label / f"seed_{seed}" / "done.json").is_file()
    # same seed, same base model, same evaluation prompts: the iteration-0 evaluation is identical
    base = {label: read_metrics(out / label / "seed_0" / "metrics.jsonl")[0]["eval/shapes.preference/mean"]
            for label in ("DanceGRPO", "MixGRPO", "MixGRPO_w_1")}
    assert len(set(base.values())) == 1, base
    w1 = read_metrics(out / "MixGRPO_w_1" / "seed_0" / "metrics.jsonl")
    assert all(r["window/size"] == 1 for r in w1[1:])
    dance = read_metrics(out / "DanceGRPO" / "seed_0" / "metrics.jsonl")
    assert all(r["window/size"] == 0 for r in dance[1:])  # no window: every step is SDE


def test_report_table_matches_the_metrics(comparison):
    tmp, report = comparison
    out = tmp / "out"
    text = report.read_text()
    assert (out / "reward_curves.png").stat().st_size > 10_000
    for label, folder in (("DanceGRPO", "DanceGRPO"), ("MixGRPO", "MixGRPO"), ("MixGRPO w=1", "MixGRPO_w_1")):
        runs = [read_metrics(out / folder / f"seed_{s}" / "metrics.jsonl") for s in (0, 1)]
        base = [r[0]["eval/shapes.preference/mean"] for r in runs]
        final = [r[-1]["eval/shapes.preference/mean"] for r in runs]
        sems = [r[-1]["eval/shapes.preference/sem"] for r in runs]
        final_sem = math.sqrt(sum(s * s for s in sems)) / 2
        cells = table_cells(text, "| variant | base |", f"| {label} |")
        mean_text, sem_text = cells["final"].split(" ± ")
        assert printed_close(mean_text, sum(final) / 2) and printed_close(sem_text, final_sem), cells
        assert printed_close(cells["base"].split(" ± ")[0], sum(base) / 2)
        assert "0.0000" not in cells["base"] + cells["final"]  # toy rewards are ~1e-6: significant digits
        nfe = sum(r["perf/nfe_rollout"] for rows in runs for r in rows[1:]) / 4
        assert float(cells["NFE rollout"]) == pytest.approx(nfe, abs=0.05)
        for seed, rows in zip((0, 1), runs):  # two training seeds: a row per seed after the variant's
            seed_cells = table_cells(text, "| variant | base |", f"| {label} · seed {seed} |")
            assert printed_close(seed_cells["final"].split(" ± ")[0], rows[-1]["eval/shapes.preference/mean"])
        assert (out / f"samples_{folder}.png").is_file() and (out / f"samples_{folder}_base.png").is_file()


def test_report_shows_a_grid_per_prompt_under_the_table(comparison):
    from .test_side_by_side import check_grids

    tmp, report = comparison
    out = tmp / "out"
    text = report.read_text()
    assert text.index("| variant | base |") < text.index("## Side by side") < text.index("## Did training change")
    data = json.loads((out / "side_by_side" / "results.json").read_text())
    assert [c["label"] for c in data["checkpoints"]] == ["base", "DanceGRPO", "MixGRPO", "MixGRPO w=1"]
    assert len(data["grids"]) == 2 and all(f"(side_by_side/{g['file']})" in text for g in data["grids"])
    first = out / "DanceGRPO" / "seed_0"
    check_grids(out / "side_by_side", data, [(first, "base"), *((out / f / "seed_0", "latest")
                                                                for f in ("DanceGRPO", "MixGRPO", "MixGRPO_w_1"))])


def test_predicted_ratio_follows_nfe_accounting(comparison):
    tmp, _ = comparison
    out = tmp / "out"
    runs = {label: [out / folder / f"seed_{s}" for s in (0, 1)]
            for label, folder in (("DanceGRPO", "DanceGRPO"), ("MixGRPO", "MixGRPO"))}
    _, table = summarize(runs, "shapes.preference")
    ratios = predicted_ratios(table, "DanceGRPO")
    assert ratios["DanceGRPO"] == pytest.approx((1.0, 1.0))
    ref, mix = table["DanceGRPO"], table["MixGRPO"]
    other = ref["iteration_s"] - ref["rollout_s"] - ref["train_s"]
    expected = (mix["nfe_rollout"] * ref["rollout_s"] / ref["nfe_rollout"]
                + mix["nfe_train"] * ref["train_s"] / ref["nfe_train"] + other) / ref["iteration_s"]
    assert ratios["MixGRPO"][0] == pytest.approx(expected)
    # the window trains 2 of 6 steps, DanceGRPO int(0.6 * 5) = 3: fewer training calls per sample
    assert mix["nfe_train"] < ref["nfe_train"]
    assert re.search(r"\| MixGRPO \| \d+\.\d\d \| \d+\.\d\d \|", (out / "report.md").read_text())
    # NFE is per sample: a variant that rolls out twice the samples per iteration costs twice the calls
    assert ref["samples"] == mix["samples"] == samples_per_iteration(out / "MixGRPO" / "seed_0")
    doubled = predicted_ratios({**table, "MixGRPO": {**mix, "samples": 2 * mix["samples"]}}, "DanceGRPO")
    assert doubled["MixGRPO"][0] == pytest.approx(expected + (expected - other / ref["iteration_s"]))


def test_samples_per_iteration_reads_the_bindings_and_the_defaults(tmp_path):
    assert samples_per_iteration(tmp_path) is None  # no run here
    (tmp_path / "bindings.json").write_text(json.dumps({"mixgrpo.core.config.TrainConfig.group_size": "54",
                                                        "TrainConfig.learning_rate": "3e-05"}))
    assert samples_per_iteration(tmp_path) == 54 * TrainConfig().prompts_per_iteration


def test_rerun_keeps_finished_runs(comparison, capsys):
    tmp, _ = comparison
    out = tmp / "out"
    stamp = (out / "MixGRPO" / "seed_1" / "metrics.jsonl").stat().st_mtime_ns
    run_compare(tmp / "compare.gin")
    assert (out / "MixGRPO" / "seed_1" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.count("finished earlier, kept") == 6


def test_cli_variant_bindings_sweep_one_component(comparison, tmp_path):
    tmp, _ = comparison
    cmd = [sys.executable, "-m", "mixgrpo", "compare", str(tmp / "compare.gin"), "--output", str(tmp_path),
           "--variant", f"euler={EXP / 'methods/mixgrpo_flash.gin'}",
           "--variant", "w3=TrainConfig.schedule = 'fixed';FixedWindow.window_size = 3",
           "--gin", "TrainConfig.iterations = 1", "--gin", "CompareConfig.seeds = (0,)"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = read_metrics(tmp_path / "w3" / "seed_0" / "metrics.jsonl")
    assert rows[-1]["window/size"] == 3 and rows[-1]["window/start"] == 0
    flash = read_metrics(tmp_path / "euler" / "seed_0" / "metrics.jsonl")
    assert flash[-1]["perf/nfe_rollout"] < 6  # compressed after the window
    assert "| w3 |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "w3" / "seed_0" / "done.json").read_text())["seconds"] > 0


def test_unknown_variant_file_is_a_clear_error(tmp_path):
    f = tmp_path / "c.gin"
    f.write_text(f"CompareConfig.base = '{EXP / 'backbones/toy.gin'}'\nCompareConfig.variants = {{'x': 'nope.gin'}}\n")
    with pytest.raises(ValueError, match="variant file 'nope.gin' not found"):
        run_compare(f)


def test_parallel_workers_train_the_same_runs(comparison, tmp_path):
    tmp, _ = comparison
    run_compare(tmp / "compare.gin", ["CompareConfig.workers = 2"], output=str(tmp_path))
    for folder in ("DanceGRPO", "MixGRPO", "MixGRPO_w_1"):
        for seed in (0, 1):
            serial = read_metrics(tmp / "out" / folder / f"seed_{seed}" / "metrics.jsonl")
            parallel = read_metrics(tmp_path / folder / f"seed_{seed}" / "metrics.jsonl")
            for a, b in zip(serial, parallel):  # one torch thread instead of two: the last bits may differ
                assert b["eval/shapes.preference/mean"] == pytest.approx(a["eval/shapes.preference/mean"], abs=1e-4)
    assert (tmp_path / "report.md").is_file()


def test_bad_worker_count_is_a_clear_error(comparison):
    tmp, _ = comparison
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_compare(tmp / "compare.gin", ["CompareConfig.workers = 0"])


def test_eval_scores_are_per_image_and_pair_base_with_final(comparison):
    import numpy as np

    from mixgrpo.commands.compare_report import paired_gain

    tmp, report = comparison
    text = report.read_text()
    gains, sems = [], []
    for seed in (0, 1):
        run = tmp / "out" / "MixGRPO" / f"seed_{seed}"
        rows = read_metrics(run / "metrics.jsonl")
        lines = [json.loads(x) for x in (run / "eval_scores.jsonl").read_text().splitlines()]
        assert [x["iteration"] for x in lines] == [0, 1, 2]
        for line, row in zip(lines, rows):
            scores = np.asarray(line["shapes.preference"], dtype=np.float64)
            assert scores.shape == (3 * 2,)  # eval prompts × eval seeds
            assert scores.mean() == pytest.approx(row["eval/shapes.preference/mean"], rel=1e-5)
        diff = np.asarray(lines[-1]["shapes.preference"]) - np.asarray(lines[0]["shapes.preference"])
        got = paired_gain(run, "shapes.preference")
        assert got[0] == pytest.approx(diff.mean(), abs=1e-9)
        assert got[1] == pytest.approx(diff.std(ddof=1) / np.sqrt(diff.size), rel=1e-9)
        assert got[2] == 6
        gains.append(got[0])
        sems.append(got[1])
    cells = table_cells(text, "| variant | gain |", "| MixGRPO |")
    mean_text, sem_text = cells["paired gain ± SE"].split(" ± ")
    assert printed_close(mean_text, np.mean(gains)), (np.mean(gains), cells)
    assert printed_close(sem_text, np.sqrt(sems[0] ** 2 + sems[1] ** 2) / 2), cells


def test_paired_gain_takes_the_repeat_of_a_resumed_run_and_skips_failed_images(tmp_path):
    from mixgrpo.commands.compare_report import paired_gain

    lines = [{"iteration": 0, "r": [0.1, 0.2, 0.3, float("nan")]},
             {"iteration": 5, "r": [9.0, 9.0, 9.0, 9.0]},  # superseded by the resumed run's repeat
             {"iteration": 5, "r": [0.2, 0.4, 0.3, 0.5]}]
    (tmp_path / "eval_scores.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    mean, sem, n = paired_gain(tmp_path, "r")
    diffs = [0.1, 0.2, 0.0]
    m = sum(diffs) / 3
    assert n == 3 and mean == pytest.approx(m)
    assert sem == pytest.approx(math.sqrt(sum((d - m) ** 2 for d in diffs) / 2 / 3))
    assert paired_gain(tmp_path, "other") is None
    (tmp_path / "eval_scores.jsonl").write_text(json.dumps(lines[1]) + "\n")
    assert paired_gain(tmp_path, "r") is None  # no base evaluation to pair with


def test_labels_that_differ_only_in_symbols_get_their_own_folders_or_a_clear_error(comparison, tmp_path):
    from mixgrpo.commands.report import slug
    from mixgrpo.core.config import ConfigError

    assert slug("MixGRPO-Flash*") != slug("MixGRPO-Flash")  # once both wrote into one folder
    assert slug("MixGRPO w=1") == "MixGRPO_w_1" and slug("***") == "variant"
    tmp, _ = comparison
    with pytest.raises(ConfigError, match="would share the run folder 'a_b'.*rename one"):
        run_compare(tmp / "compare.gin", output=str(tmp_path),
                    variants=[f"a b={EXP / 'methods/mixgrpo.gin'}", f"a/b={EXP / 'methods/mixgrpo.gin'}"])
    assert not any(tmp_path.iterdir()), "nothing may run before the labels are checked"


def test_the_base_model_is_evaluated_once_per_identical_setting(tmp_path, monkeypatch):
    """Three variants × two seeds share two base evaluations (one per training seed, which picks the
    evaluation prompts); each run's iteration-0 row and grid equal a run that evaluates for itself."""
    from mixgrpo.commands import base_eval
    from mixgrpo.core.trainer import Trainer

    (tmp_path / "world.gin").write_text(WORLD)
    (tmp_path / "compare.gin").write_text(
        "# cached base evaluation\n"
        f"CompareConfig.base = '{tmp_path / 'world.gin'}'\n"
        "CompareConfig.variants = {\n"
        f"    'DanceGRPO': '{EXP / 'methods/dancegrpo.gin'}',\n"
        f"    'MixGRPO': '{EXP / 'methods/mixgrpo.gin'}',\n"
        f"    'Flash': '{EXP / 'methods/mixgrpo_flash.gin'}',\n"
        "}\n"
        "CompareConfig.seeds = (0, 1)\n"
        f"CompareConfig.output_dir = '{tmp_path / 'out'}'\n")
    from mixgrpo.core import evaluation

    calls = []
    evaluate = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda trainer, *a, **k: calls.append(trainer.config.seed) or evaluate(
        trainer, *a, **k))
    run_compare(tmp_path / "compare.gin")
    # base: once per seed; then iterations 1 and 2 of each of the 6 runs
    assert sorted(calls).count(0) == 1 + 3 * 2 and sorted(calls).count(1) == 1 + 3 * 2
    out = tmp_path / "out"
    assert len(list((out / "base_eval").glob("*/row.json"))) == 2
    for seed in (0, 1):
        base_rows = [_rows(out, label, seed)[0] for label in ("DanceGRPO", "MixGRPO", "Flash")]
        assert base_rows[0] == base_rows[1] == base_rows[2]
        grids = [(out / label / f"seed_{seed}" / "samples" / "iter_000000.png").read_bytes()
                 for label in ("DanceGRPO", "MixGRPO", "Flash")]
        assert grids[0] == grids[1] == grids[2]
    # a run on its own (no cache) computes the same row
    from mixgrpo.core.config import parse_gin
    from mixgrpo.core.trainer import TrainConfig

    pm = parse_gin([EXP / "methods/mixgrpo.gin", tmp_path / "world.gin"],
                   [f"TrainConfig.output_dir = '{tmp_path / 'alone'}'", "TrainConfig.iterations = 1"])
    alone = Trainer(TrainConfig(), pm)
    row = {"iteration": 0}
    base_eval.evaluate_base(alone, row, None)
    assert {k: v for k, v in row.items()} == {k: v for k, v in _rows(out, "MixGRPO", 0)[0].items()}


def test_more_than_ten_runs_keep_apart_in_the_plots(tmp_path):
    from mixgrpo.commands.compare_plots import plot_curves, style

    looks = [style(i) for i in range(25)]
    assert len({(s["color"], s["linestyle"]) for s in looks}) == 25  # colors repeat only with another line
    table = {f"run {i}": {"curves": [[(0, 0.4, 0.01, 0.0, 0.0), (10, 0.4 + i / 100, 0.01, 5.0, 100.0)]]}
             for i in range(12)}
    plot_curves(table, "shapes.composition", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_the_hacking_figure_shows_the_held_out_rewards_never_trained_on(tmp_path):
    from mixgrpo.commands.compare_plots import plot_measures, untrained_rewards

    rows = [{"iteration": k, "reward/shapes.composition/mean": 0.5, "eval/shapes.composition/mean": 0.44,
             "eval/shapes.preference/mean": 0.48 - k / 100, "eval/shapes.preference/sem": 0.01,
             "eval/diversity/mean": 1.2, "eval/diversity/sem": 0.01} for k in (0, 10, 20)]
    assert untrained_rewards(rows) == ["shapes.preference"]  # the trained reward and the diversity are not
    assert plot_measures({"a": rows, "b": rows}, tmp_path / "hacking.png")
    import matplotlib.image

    height, width = matplotlib.image.imread(tmp_path / "hacking.png").shape[:2]
    assert width > 2.5 * height  # two panels side by side: the preference score and the diversity
    assert not plot_measures({"a": [{"iteration": 0, "reward/x/mean": 1.0}]}, tmp_path / "none.png")


def test_the_seeds_of_a_variant_share_its_color_and_differ_in_line():
    from mixgrpo.commands.compare_plots import run_styles

    looks = run_styles(["A · seed_0", "A · seed_1", "A · seed_2", "B · seed_0", "B · seed_1", "C"])
    assert len({looks[f"A · seed_{k}"]["color"] for k in range(3)}) == 1
    assert len({looks[f"A · seed_{k}"]["linestyle"] for k in range(3)}) == 3
    assert looks["B · seed_0"]["color"] != looks["A · seed_0"]["color"] != looks["C"]["color"]


def test_the_longest_runs_named_in_start_first_start_first_and_the_report_keeps_its_order(comparison, tmp_path,
                                                                                          capsys):
    from mixgrpo.commands.compare import start_order

    jobs = [(label, seed, None) for label in ("a", "b", "c") for seed in (0, 1)]
    assert [j[:2] for j in start_order(jobs, ("c", "a"))] == [("c", 0), ("c", 1), ("a", 0), ("a", 1), ("b", 0),
                                                               ("b", 1)]
    tmp, _ = comparison
    capsys.readouterr()
    bindings = ["CompareConfig.seeds = (0,)", "CompareConfig.start_first = ('MixGRPO',)"]
    report = run_compare(tmp / "compare.gin", bindings, output=str(tmp_path))
    started = re.findall(r"\[compare\] (.+) seed 0 →", capsys.readouterr().out)
    assert started == ["MixGRPO", "DanceGRPO", "MixGRPO w=1"]
    text = Path(report).read_text()
    assert text.index("| DanceGRPO") < text.index("| MixGRPO ") < text.index("| MixGRPO w=1")


def test_a_start_first_label_that_is_not_a_variant_is_refused_before_any_run(comparison, tmp_path):
    tmp, _ = comparison
    with pytest.raises(ValueError, match=r"start_first names 'MixGRPO-Flash', not a label of CompareConfig.variants"):
        run_compare(tmp / "compare.gin", ["CompareConfig.start_first = ('MixGRPO-Flash',)"], output=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_runs_that_differ_only_in_training_draws_share_the_base_evaluation(tmp_path):
    """``ShapesPrompts.pool`` changes the training prompts only (declared ``training_only``): the base
    evaluation's signature ignores it, and the held-out prompts are indeed the same; ``levels``
    changes them, and the signature."""
    import gin

    from mixgrpo.commands import base_eval
    from mixgrpo.core.config import parse_gin
    from mixgrpo.core.trainer import Trainer

    (tmp_path / "world.gin").write_text(WORLD)

    def trainer(*bindings):  # and its signature, taken as a run takes it: under the run's own gin
        gin.clear_config()
        pm = parse_gin([EXP / "methods/mixgrpo.gin", tmp_path / "world.gin"],
                       [f"TrainConfig.output_dir = '{tmp_path / 'run'}'", *bindings])
        made = Trainer(TrainConfig(), pm)
        return made, base_eval.signature(made)

    (plain, key), (pooled, pooled_key) = trainer(), trainer("ShapesPrompts.pool = 4")
    easy, easy_key = trainer("ShapesPrompts.levels = (1,)")
    gin.clear_config()
    assert pooled.prompt_set.pool == 4 and "pool" in pooled.prompt_set.training_only
    assert plain.prompt_set("eval", 8, 1) == pooled.prompt_set("eval", 8, 1)
    assert plain.prompt_set("train", 2, 0, iteration=1) != pooled.prompt_set("train", 2, 0, iteration=1)
    assert key == pooled_key
    assert plain.prompt_set("eval", 8, 1) != easy.prompt_set("eval", 8, 1)
    assert key != easy_key


def test_the_base_evaluation_on_every_core_equals_one_thread(tmp_path):
    """A parallel comparison evaluates the base model alone on every core, its runs on one thread
    each: on the shapes world the thread count leaves every number and image as it is."""
    import gin
    import torch

    from mixgrpo.core import evaluation
    from mixgrpo.core.config import parse_gin
    from mixgrpo.core.trainer import Trainer

    gin.clear_config()
    pm = parse_gin([EXP / "methods/mixgrpo.gin", EXP / "shapes/world.gin"],
                   [f"TrainConfig.output_dir = '{tmp_path / 'run'}'", "TrainConfig.eval_prompts = 32",
                    "TrainConfig.progress = False"])
    trainer = Trainer(TrainConfig(), pm)
    threads = torch.get_num_threads()
    rows, scores = [], []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            scores.append({})
            rows.append(evaluation.evaluate(trainer, scores[-1]))
    finally:
        torch.set_num_threads(threads)
        gin.clear_config()
    assert rows[0] == rows[1] and scores[0] == scores[1]
    assert len(scores[0]["shapes.composition"]) == 64
