"""``mixgrpo sample`` for an editing backbone (FLUX.1-Kontext: a JSONL file or a folder of edits, each
prompt with its source image) and at another size than the config's (``--height``/``--width``, the
dynamic σ grid's ``mu`` following the size as ``FluxPipeline``'s does); the errors of both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.commands.export import ExportError
from mixgrpo.commands.sample import GRID, MANIFEST, image_name, run_sample
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.core.sigmas import flux_mu
from mixgrpo.core.types import EditPrompt
from mixgrpo.plugins.backbones.flux import FluxBackbone
from mixgrpo.plugins.backbones.flux_kontext import FluxKontextBackbone
from mixgrpo.plugins.backbones.tiny_kontext import KONTEXT_SCHEDULER, build_tiny_kontext
from mixgrpo.plugins.samplers.euler import Euler

from .test_export import ROOT, assert_one_line_error, flux_dir, flux_pipeline, run_cli  # noqa: F401  (fixture)
from .test_sample import as_png_levels, png, toy_config

SOURCE = (24, 40)  # the sources' size (the backbone's source size): the pipeline need not resize them
TEXT = 32  # T5 tokens (the tiny tokenizer's length)
STEPS = 3
TOL = 2e-5  # images in [0, 1]: float rounding only
INSTRUCTIONS = ["a red circle", "two blue squares on the left"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices run faster on one thread of a busy 2-core machine (tests/plugins/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    return build_tiny_kontext(tmp_path_factory.mktemp("kontext") / "snapshot")


def write_sources(folder: Path) -> list[Path]:
    """Two 24×40 source PNGs (colour ramps with a square) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(2):
        y, x = np.mgrid[0:SOURCE[0], 0:SOURCE[1]]
        image = np.stack([(x * 6 + 90 * n) % 256, (y * 9 + 50 * n) % 256, np.full_like(x, 120 * n)], -1)
        image[4 + 3 * n:12 + 3 * n, 10:18] = 255 - 90 * n
        Image.fromarray(image.astype(np.uint8)).save(folder / f"source{n}.png")
        paths.append(folder / f"source{n}.png")
    return paths


def write_edits(path: Path, images: list[str]) -> Path:
    """A JSONL file of edits: ``INSTRUCTIONS[k]`` of ``images[k]`` (as written, relative or not)."""
    path.write_text("".join(json.dumps({"image": image, "instruction": text}) + "\n"
                            for image, text in zip(images, INSTRUCTIONS, strict=True)))
    return path


def kontext_gin(tmp_path: Path, model: Path | str) -> Path:
    gin = tmp_path / "kontext.gin"
    gin.write_text(f"include '{ROOT / 'experiments' / 'methods' / 'mixgrpo.gin'}'\n"
                   "TrainConfig.backbone = 'flux_kontext'\n"
                   f"FluxKontextBackbone.path = '{model}'\n"
                   f"FluxKontextBackbone.source_height = {SOURCE[0]}\n"
                   f"FluxKontextBackbone.source_width = {SOURCE[1]}\n"
                   f"FluxKontextBackbone.max_sequence_length = {TEXT}\n"
                   f"TrainConfig.num_steps = {STEPS}\n"
                   "TrainConfig.grid = 'dynamic'\n"
                   f"TrainConfig.mu = {flux_mu(8 * 8)}\n"  # the pipeline's at 32×32 (8×8 tokens)
                   "TrainConfig.progress = False\n"
                   f"TrainConfig.output_dir = '{tmp_path / 'never'}'\n")
    return gin


def kontext_pipeline_images(kontext_dir: Path, bb: FluxKontextBackbone, edits: list[EditPrompt],
                            seed: int) -> torch.Tensor:
    """``FluxKontextPipeline``'s images from ``sample``'s noise (keyed by the prompt's index), the sources
    as given and the pipeline's own dynamic grid."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    x = torch.stack([keyed_normal(bb.latent_shape(), seed, "eval", n) for n in range(len(edits))])
    c, h, w = bb.latent_shape()
    with torch.no_grad():
        return pipe(image=[Image.open(p.image) for p in edits], prompt=[str(p) for p in edits],
                    latents=FluxKontextPipeline._pack_latents(x, len(edits), c, h, w), height=bb.height,
                    width=bb.width, max_area=bb.height * bb.width, _auto_resize=False, num_inference_steps=STEPS,
                    guidance_scale=bb.guidance, max_sequence_length=TEXT, output_type="pt").images


def test_edits_sample_through_run_sample_and_the_cli_as_the_kontext_pipeline_draws(tmp_path, capsys, kontext_dir):
    sources = write_sources(tmp_path / "edits" / "src")
    jsonl = write_edits(tmp_path / "edits" / "edits.jsonl", ["src/source0.png", "src/source1.png"])  # relative
    gin = kontext_gin(tmp_path, kontext_dir)
    manifest = run_sample(gin, str(jsonl), tmp_path / "api", seeds="3", batch_size=2, progress=False)
    rc, _, err = run_cli(capsys, "sample", gin, "--prompts", jsonl, "--seeds", "3", "--out", tmp_path / "cli")
    assert rc == 0, err
    folder = tmp_path / "folder"  # the edit prompt set's other layout: images with same-named .txt instructions
    folder.mkdir()
    for n, (source, text) in enumerate(zip(sources, INSTRUCTIONS, strict=True)):
        (folder / f"e{n}.png").write_bytes(source.read_bytes())
        (folder / f"e{n}.txt").write_text(text + "\n")
    rc, _, err = run_cli(capsys, "sample", gin, "--prompts", folder, "--seeds", "3", "--out", tmp_path / "dir")
    assert rc == 0, err

    names = [image_name(n, 3) for n in range(2)]
    for out in ("api", "cli", "dir"):
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == sorted([*names, GRID, MANIFEST])
    assert [(e["file"], e["prompt"], Path(e["source_image"])) for e in manifest["images"]] == [
        (names[n], INSTRUCTIONS[n], sources[n]) for n in range(2)]
    cli = json.loads((tmp_path / "cli" / MANIFEST).read_text())
    assert [Path(e["source_image"]) for e in cli["images"]] == sources
    assert (manifest["sampling"]["height"], manifest["sampling"]["width"]) == (32, 32)

    bb = FluxKontextBackbone(str(kontext_dir), source_height=SOURCE[0], source_width=SOURCE[1],
                             max_sequence_length=TEXT)
    edits = [EditPrompt(text, source) for text, source in zip(INSTRUCTIONS, sources, strict=True)]
    expected = kontext_pipeline_images(kontext_dir, bb, edits, seed=3)
    ours = sample_ode(bb, edits, [3, 3], setup=SamplingSetup(num_steps=STEPS, grid="dynamic", mu=bb.pipeline_mu()),
                      solver=Euler())
    assert float((ours - expected).abs().max()) < TOL
    for n, name in enumerate(names):
        got = png(tmp_path / "api" / name)
        assert got.shape == (3, 32, 32)
        assert torch.equal(got, as_png_levels(ours[n]))  # the backbone's own rollout, level for level
        assert (got - as_png_levels(expected[n])).abs().max() <= 1  # the pipeline's, up to float rounding
        assert torch.equal(got, png(tmp_path / "cli" / name)) and torch.equal(got, png(tmp_path / "dir" / name))


def test_bad_edit_inputs_are_clear_errors_before_any_model_loads(tmp_path, capsys):
    write_sources(tmp_path / "src")
    jsonl = write_edits(tmp_path / "edits.jsonl", ["src/source0.png", "src/source1.png"])
    missing = write_edits(tmp_path / "missing.jsonl", ["src/source0.png", "src/gone.png"])
    # no snapshot at this path: a model that started loading would fail on it instead
    kontext = kontext_gin(tmp_path, tmp_path / "no_snapshot")
    toy = toy_config(tmp_path)
    cases = [
        (kontext, "a red circle", ExportError,
         ["backbone 'flux_kontext' edits a source image, but the prompt 'a red circle' of --prompts carries none: "
          'pass --prompts a JSONL file of edits, one a line, e.g. {"image": "path/to/source.png", "instruction": '
          '"what to change"}', "or a folder of source images, each with its instruction in a .txt file"]),
        (toy, str(jsonl), ExportError,
         [f"backbone 'toy' does not take source images, but {jsonl} holds edits (an instruction with a source "
          "image each): pass plain prompts"]),
        (kontext, str(missing), ExportError,
         [f"{missing}, line 2: source image {str(tmp_path / 'src' / 'gone.png')!r} not found"]),
    ]
    for gin, prompts, error, needles in cases:
        with pytest.raises(error) as raised:
            run_sample(gin, prompts, tmp_path / "api", progress=False)
        assert all(needle in str(raised.value) for needle in needles), str(raised.value)
        rc, _, err = run_cli(capsys, "sample", gin, "--prompts", prompts, "--out", tmp_path / "cli")
        assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()
    with pytest.raises(ExportError, match="edits a source image, but the prompt 'a green star' of the prompt list"):
        run_sample(kontext, ["a green star"], tmp_path / "api", progress=False)


# -- another size than the config's ------------------------------------------------------------------
def flux_gin(tmp_path: Path, model: Path) -> Path:
    gin = tmp_path / "flux.gin"
    gin.write_text(f"include '{ROOT / 'experiments' / 'methods' / 'mixgrpo.gin'}'\n"
                   "TrainConfig.backbone = 'flux'\n"
                   f"FluxBackbone.path = '{model}'\n"
                   "TrainConfig.num_steps = 4\n"
                   "TrainConfig.grid = 'dynamic'\n"
                   f"TrainConfig.mu = {flux_mu(8 * 8)}\n"  # FluxPipeline's at the snapshot's 32×32 (8×8 tokens)
                   f"TrainConfig.output_dir = '{tmp_path / 'never'}'\n")
    return gin


def test_another_size_draws_what_the_flux_pipeline_draws_at_that_size(tmp_path, capsys, flux_dir):  # noqa: F811
    """At 48×64 (12×16 tokens) the dynamic grid's mu is the pipeline's for that size, not the config's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    gin = flux_gin(tmp_path, flux_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(INSTRUCTIONS) + "\n")
    rc, _, err = run_cli(capsys, "sample", gin, "--prompts", prompts, "--seeds", "1", "--height", "48",
                         "--width", "64", "--out", tmp_path / "out")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert (manifest["sampling"]["height"], manifest["sampling"]["width"]) == (48, 64)
    assert manifest["sampling"]["mu"] == pytest.approx(flux_mu(12 * 16))

    bb = FluxBackbone(str(flux_dir), height=48, width=64)
    pipe = flux_pipeline(flux_dir)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**KONTEXT_SCHEDULER)  # FLUX.1's: mu from the token count
    x = torch.stack([keyed_normal(bb.latent_shape(), 1, "eval", n) for n in range(2)])
    c, h, w = bb.latent_shape()
    with torch.no_grad():  # no sigmas given: the pipeline's own grid at this size
        expected = pipe(INSTRUCTIONS, latents=FluxPipeline._pack_latents(x, 2, c, h, w), height=48, width=64,
                        num_inference_steps=4, max_sequence_length=bb.max_sequence_length, output_type="pt").images

    def ours(mu: float) -> torch.Tensor:
        return sample_ode(bb, INSTRUCTIONS, [1, 1], setup=SamplingSetup(num_steps=4, grid="dynamic", mu=mu),
                          solver=Euler())

    parity = float((ours(manifest["sampling"]["mu"]) - expected).abs().max())
    stale = float((ours(flux_mu(8 * 8)) - expected).abs().max())  # the config's mu, kept at the new size
    assert parity < TOL and stale > 20 * max(parity, TOL), (parity, stale)
    for n in range(2):
        got = png(tmp_path / "out" / image_name(n, 1))
        assert got.shape == (3, 48, 64)
        assert (got - as_png_levels(expected[n])).abs().max() <= 1


def test_a_size_the_backbone_cannot_draw_is_a_one_line_error(tmp_path, capsys, flux_dir):  # noqa: F811
    gin = flux_gin(tmp_path, flux_dir)
    cases = [
        (gin, ["--height", "30"], ["--height 30 is not a multiple of 4", "pass --height 28 or 32"]),  # before loading
        (gin, ["--width", "0"], ["--width must be a positive number of pixels, got 0"]),
        (toy_config(tmp_path), ["--height", "16", "--width", "16"],
         ["backbone 'toy' (ToyBackbone) has no height or width setting", "--height and --width do not apply"]),
    ]
    for source, args, needles in cases:
        rc, _, err = run_cli(capsys, "sample", source, "--prompts", "a red circle", *args, "--out", tmp_path / "out")
        assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "out").exists()
