"""``mixgrpo sample``: PNGs of (prompt, seed) pairs equal to what diffusers' pipelines draw from the
same noise and σ grid, before and after training; overrides; errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.commands.sample import GRID, MANIFEST, image_name, parse_seeds, run_sample
from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import sample_ode
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.sd3 import SD3Backbone

from .test_export import (  # noqa: F401  (fixtures)
    ROOT,
    assert_one_line_error,
    flux_dir,
    flux_pipeline,
    pipeline_images,
    run_cli,
    sd3_dir,
    sd3_pipeline,
    train_run,
)

PROMPTS = ["a red circle", "two blue squares on the left", "a green star above a yellow ring"]


def png(path: Path) -> torch.Tensor:
    """A PNG as ``[3, H, W]`` integers 0..255."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).int()


def as_png_levels(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(0, 1) * 255).round().int()


def toy_config(tmp_path: Path, *extra: str) -> Path:
    """A gin file for the toy backbone (seconds on a CPU)."""
    gin = tmp_path / "toy.gin"
    gin.write_text("\n".join([f"include '{ROOT / 'experiments' / 'runs' / 'toy_smoke.gin'}'",
                              "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
                              f"TrainConfig.output_dir = '{tmp_path / 'toy_run'}'", *extra]) + "\n")
    return gin


def test_before_and_after_pair_up_and_match_the_flux_pipeline(tmp_path, capsys, flux_dir):  # noqa: F811
    trainer = train_run(tmp_path / "run", "flux", flux_dir, True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    common = ["--prompts", prompts, "--seeds", "0-1", "--batch-size", "3"]  # 4 images in two batches
    for source, extra, out in [(tmp_path / "run", [], "after"),
                               (tmp_path / "run", ["--checkpoint", "base"], "before"),
                               (tmp_path / "run" / "config.gin", [], "before_from_config")]:
        rc, stdout, err = run_cli(capsys, "sample", source, *common, *extra, "--out", tmp_path / out)
        assert rc == 0, err
    names = [image_name(n, s) for n in range(2) for s in (0, 1)]
    assert sorted(p.name for p in (tmp_path / "after").iterdir()) == sorted([*names, GRID, MANIFEST])
    manifest = json.loads((tmp_path / "after" / MANIFEST).read_text())
    assert manifest["iteration"] == 1 and manifest["checkpoint"].endswith("iter_000001")
    assert [(e["prompt_index"], e["seed"], e["prompt"]) for e in manifest["images"]] == [
        (n, s, PROMPTS[n]) for n in range(2) for s in (0, 1)]
    assert json.loads((tmp_path / "before" / MANIFEST).read_text())["checkpoint"] == "base"

    before_pipe = flux_pipeline(flux_dir)
    after_pipe = flux_pipeline(flux_dir)
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "lora")
    assert rc == 0, err
    after_pipe.load_lora_weights(tmp_path / "lora")
    worst = {"before": 0, "after": 0}
    changed = 0
    for seed in (0, 1):
        expected = {"before": as_png_levels(pipeline_images("flux", before_pipe, trainer.backbone, PROMPTS[:2], seed)),
                    "after": as_png_levels(pipeline_images("flux", after_pipe, trainer.backbone, PROMPTS[:2], seed))}
        for n in range(2):
            name = image_name(n, seed)
            for when in ("before", "after"):
                diff = (png(tmp_path / when / name) - expected[when][n]).abs().max().item()
                worst[when] = max(worst[when], diff)
            assert torch.equal(png(tmp_path / "before" / name), png(tmp_path / "before_from_config" / name))
            changed += int(not torch.equal(png(tmp_path / "before" / name), png(tmp_path / "after" / name)))
    assert worst["before"] <= 1 and worst["after"] <= 1, worst  # 8-bit levels: equal up to float rounding
    assert changed >= 3, changed  # training changed the images


def test_sampled_images_use_the_noise_of_the_trainers_grids(tmp_path):
    """Prompt n with seed s starts from the noise ``sample_ode`` gives prompt n of a grid drawn with
    seed s, whatever the batch size."""
    gin = toy_config(tmp_path)
    manifest = run_sample(gin, PROMPTS, tmp_path / "out", seeds="3,0", batch_size=2, progress=False)
    assert manifest["checkpoint"] == "base" and manifest["seeds"] == [3, 0]
    config, pm = load_config(gin)
    backbone = pm.create("backbone", config.backbone)
    for seed in (3, 0):
        reference = sample_ode(backbone, PROMPTS, [seed] * len(PROMPTS),
                               setup=_setup(config), solver=pm.create("sampler", "euler"))
        for n in range(len(PROMPTS)):
            assert torch.equal(png(tmp_path / "out" / image_name(n, seed)), as_png_levels(reference[n]))
    assert (tmp_path / "out" / GRID).stat().st_size > 0


def _setup(config):
    from mixgrpo.core.rollout import SamplingSetup

    return SamplingSetup(num_steps=config.num_steps, shift=config.shift, grid=config.grid)


def test_steps_shift_and_guidance_overrides_match_the_sd3_pipeline(tmp_path, capsys, sd3_dir):  # noqa: F811
    gin = tmp_path / "sd3.gin"
    gin.write_text(f"include '{ROOT / 'experiments' / 'methods' / 'mixgrpo.gin'}'\n"
                   "TrainConfig.backbone = 'sd3'\n"
                   f"SD3Backbone.path = '{sd3_dir}'\n"
                   "SD3Backbone.max_sequence_length = 12\n"
                   "TrainConfig.num_steps = 4\n"
                   f"TrainConfig.output_dir = '{tmp_path / 'never'}'\n")
    rc, _, err = run_cli(capsys, "sample", gin, "--prompts", "a red circle", "--seeds", "5", "--steps", "3",
                         "--shift", "2.0", "--guidance", "2.0", "--out", tmp_path / "over")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "sample", gin, "--prompts", "a red circle", "--seeds", "5", "--out", tmp_path / "dflt")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "over" / MANIFEST).read_text())
    assert manifest["sampling"]["num_steps"] == 3 and manifest["sampling"]["cfg_scale"] == 2.0
    backbone = SD3Backbone(str(sd3_dir), max_sequence_length=12)
    expected = pipeline_images("sd3", sd3_pipeline(sd3_dir), backbone, ["a red circle"], seed=5, steps=3, shift=2.0,
                               guidance=2.0)
    got = png(tmp_path / "over" / image_name(0, 5))
    assert (got - as_png_levels(expected[0])).abs().max() <= 1
    assert (got - png(tmp_path / "dflt" / image_name(0, 5))).abs().max() > 2  # the overrides took effect


def test_seed_lists():
    assert parse_seeds("0") == [0]
    assert parse_seeds("3,0-2,3") == [3, 0, 1, 2]
    with pytest.raises(ValueError, match="ranges"):
        parse_seeds("a,b")


def test_bad_input_is_a_clear_error_and_nothing_is_overwritten(tmp_path, capsys):
    gin = toy_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "p0000_s0.png").write_bytes(b"mine")
    rc, _, err = run_cli(capsys, "sample", gin, "--prompts", "a red circle", "--out", out)
    assert_one_line_error(rc, err, "not empty", "--force")
    assert (out / "p0000_s0.png").read_bytes() == b"mine"
    rc, _, err = run_cli(capsys, "sample", gin, "--prompts", "a red circle", "--out", out, "--force")
    assert rc == 0, err
    assert (out / "p0000_s0.png").read_bytes() != b"mine"

    cases = [
        (["--prompts", str(tmp_path / "missing.txt")], "prompt file"),
        (["--prompts", "a red circle", "--solver", "sde.flow"], "stochastic"),
        (["--prompts", "a red circle", "--solver", "nope"], "nope"),
        (["--prompts", "a red circle", "--seeds", "x"], "--seeds"),
        (["--prompts", "a red circle", "--steps", "0"], "--steps"),
        (["--prompts", "a red circle", "--checkpoint", "iter_000009"], "not found"),
    ]
    for args, needle in cases:
        rc, _, err = run_cli(capsys, "sample", gin, *args, "--out", tmp_path / "new")
        assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())

    # a run without checkpoints (every run writes its final one: a run stopped before it): the base
    # model only when asked for
    config, pm = load_config(gin, ["TrainConfig.iterations = 1"])
    Trainer(config, pm).train()
    shutil.rmtree(tmp_path / "toy_run" / "checkpoints")
    rc, _, err = run_cli(capsys, "sample", tmp_path / "toy_run", "--prompts", "a red circle", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "has no checkpoint", "--checkpoint base")
    rc, _, err = run_cli(capsys, "sample", tmp_path / "toy_run", "--prompts", "a red circle", "--checkpoint", "base",
                         "--out", tmp_path / "r")
    assert rc == 0, err
