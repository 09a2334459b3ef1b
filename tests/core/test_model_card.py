"""What a run leaves for people to read: the model card, the end-of-run summary, scored sample grids."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mixgrpo.commands.cli import main
from mixgrpo.commands.report import format_estimate, read_metrics

from .test_side_by_side import ROOT, TOY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "toy_card"
    grids = []
    import mixgrpo.core.evaluation as report  # the training run's grids are drawn by the engine

    original = report.save_sample_grid

    def spy(images, captions, path, columns=4, title=None):
        grids.append((images.clone(), list(captions), Path(path).name, title))
        return original(images, captions, path, columns=columns, title=title)

    report.save_sample_grid = spy
    try:
        import io
        from contextlib import redirect_stdout

        buffer = io.StringIO()
        with redirect_stdout(buffer):
            rc = main(["train", str(ROOT / "experiments" / "runs" / "toy_smoke.gin"), "--output", str(out),
                       *[a for b in TOY for a in ("--gin", b)]])
    finally:
        report.save_sample_grid = original
    assert rc == 0
    return out, buffer.getvalue(), grids


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def test_model_card_holds_the_held_out_numbers_config_curve_and_grids(run):
    out, _, _ = run
    card = (out / "README.md").read_text()
    rows = read_metrics(out / "metrics.jsonl")
    base, final = rows[0], rows[-1]
    line = next(x for x in card.splitlines() if x.startswith("| shapes.preference | yes |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    for cell, row in ((cells[2], base), (cells[3], final)):
        mean, sem = numbers(cell)[:2]
        assert mean == pytest.approx(row["eval/shapes.preference/mean"], rel=0.02)
        assert sem == pytest.approx(row["eval/shapes.preference/sem"], rel=0.06)
        assert f"(iteration {row['iteration']})" in cell
    assert numbers(cells[4])[0] == pytest.approx(final["eval/shapes.preference/mean"]
                                                 - base["eval/shapes.preference/mean"], rel=0.06)
    assert "0.0000" not in card  # the toy reward is ~1e-5: written in scientific notation
    assert card.startswith("---\n") and "pipeline_tag: text-to-image" in card
    assert "| method | MixGRPO: objective `mixgrpo`" in card and "`shapes.preference` (weight 1)" in card
    assert "| budget | 2 iterations × 2 prompts × 4 samples" in card
    assert (out / "config.gin").read_text().rstrip() in card
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card):
        assert (out / link).is_file(), link
    assert "(reward_curve.png)" in card and "(samples/iter_000000.png)" in card and "(samples/iter_000002.png)" in card
    assert (out / "reward_curve.png").stat().st_size > 5_000
    assert f"mixgrpo sample {out}" in card  # the toy backbone has no diffusers export: the card says how to draw


def test_end_of_run_prints_base_and_final_with_standard_errors(run):
    out, printed, _ = run
    rows = read_metrics(out / "metrics.jsonl")
    b, f = rows[0], rows[-1]
    key = "eval/shapes.preference"
    expected = (f"held-out shapes.preference: {format_estimate(b[key + '/mean'], b[key + '/sem'])} at iteration 0 → "
                f"{format_estimate(f[key + '/mean'], f[key + '/sem'])} at iteration 2")
    assert expected in printed, printed
    assert "0.0000" not in printed and f"model card: {out / 'README.md'}" in printed
    line = next(x for x in printed.splitlines() if "held-out shapes.preference" in x)
    mean, sem = numbers(line.split(": ", 1)[1])[:2]
    assert mean == pytest.approx(b["eval/shapes.preference/mean"], rel=0.02) and mean != 0


@pytest.mark.parametrize("mean, sem, text", [
    (0.4571, 0.0012, "0.4571 ± 0.0012"), (12.34, 1.5, "12.3 ± 1.5"), (1.02e-5, 3.1e-7, "1.02e-05 ± 3.1e-07"),
    (1e-5, 1e-3, "1e-05 ± 0.001"), (0.5, float("nan"), "0.5"),
])
def test_estimates_are_written_at_the_precision_of_their_error(mean, sem, text):
    assert format_estimate(mean, sem) == text


def test_sample_grids_carry_the_iteration_and_each_image_score(run):
    out, _, grids = run
    from mixgrpo.plugins.rewards.shapes import PreferenceReward

    assert [(name, title) for _, _, name, title in grids] == [("iter_000000.png", "iteration 0 (base model)"),
                                                              ("iter_000002.png", "iteration 2")]
    for images, captions, _, _ in grids:
        prompts = [c.split("\n")[0] for c in captions]
        scores = PreferenceReward()(images, prompts)
        for caption, score in zip(captions, scores):
            assert caption.split("\n")[1] == f"preference {float(score):.3g}"


@pytest.mark.parametrize("method", ["flowgrpo", "dancegrpo", "mixgrpo_flash"])
def test_metrics_hold_only_documented_names(tmp_path, method):
    from mixgrpo.core.config import load_config
    from mixgrpo.core.metrics import NAMES as METRIC_NAMES
    from mixgrpo.core.trainer import Trainer

    from .conftest import TOY as METHOD_TOY

    config, pm = load_config(ROOT / "experiments" / "methods" / f"{method}.gin",
                             [*METHOD_TOY, "TrainConfig.eval_every = 1", "TrainConfig.eval_prompts = 2",
                              "TrainConfig.eval_rewards = ('shapes.composition',)", "TrainConfig.tensorboard = False",
                              f"TrainConfig.output_dir = '{tmp_path}'"])
    Trainer(config, pm).train()
    keys = {k for row in read_metrics(tmp_path / "metrics.jsonl") for k in row}
    names = {re.sub(r"^(reward|eval)/shapes\.(preference|composition)/", r"\1/<name>/", k) for k in keys}
    assert names <= set(METRIC_NAMES), sorted(names - set(METRIC_NAMES))
    assert {"eval/<name>/sem", "policy/skipped_steps", "perf/nfe_train", "iteration"} <= names
    documented = (ROOT / "docs" / "run-directory.md").read_text()
    assert all(f"`{name}`" in documented for name in METRIC_NAMES)


@pytest.mark.parametrize("preset", sorted((ROOT / "experiments" / "methods").glob("*.gin")), ids=lambda p: p.stem)
def test_every_method_preset_names_its_method_for_the_model_card(preset):
    """The card's method is the preset's ``TrainConfig.method``: no name is derived from component names."""
    import gin

    from mixgrpo.commands.model_card import method_name
    from mixgrpo.core.config import TrainConfig, parse_gin

    text = preset.read_text()
    stated = re.findall(r"^TrainConfig\.method = '([^']+)'", text, flags=re.M)
    assert len(stated) == 1, f"{preset.name} must bind TrainConfig.method once"
    gin.clear_config()
    try:
        parse_gin([str(preset)], ["TrainConfig.backbone = 'toy'"])
        assert method_name(TrainConfig()) == stated[0]
    finally:
        gin.clear_config()
