"""``mixgrpo sample --height/--width`` refuses a size the model cannot draw before the model loads, where
the model folder's config files say what it needs (the backbone's ``pixel_multiple``), and once loaded
where they do not; each diffusers backbone's ``pixel_multiple`` is the multiple its own after-load check
(``_set_latent_layout``) demands."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest

from mixgrpo.commands import sample
from mixgrpo.plugins.backbones.diffusers_base import DiffusersBackbone
from mixgrpo.plugins.backbones.flux import FluxBackbone
from mixgrpo.plugins.backbones.flux2 import Flux2Backbone
from mixgrpo.plugins.backbones.flux_kontext import FluxKontextBackbone
from mixgrpo.plugins.backbones.qwenimage import QwenImageBackbone
from mixgrpo.plugins.backbones.sd3 import SD3Backbone
from mixgrpo.plugins.backbones.tiny import build_tiny_flux, build_tiny_sd3
from mixgrpo.plugins.backbones.tiny_flux2 import build_tiny_flux2
from mixgrpo.plugins.backbones.tiny_kontext import build_tiny_kontext
from mixgrpo.plugins.backbones.tiny_qwenimage import build_tiny_qwenimage
from mixgrpo.plugins.backbones.tiny_zimage import build_tiny_zimage
from mixgrpo.plugins.backbones.zimage import ZImageBackbone

from .test_export import ROOT, assert_one_line_error, flux_dir, run_cli  # noqa: F401  (fixture)
from .test_sample_edit import flux_gin

FLUX_VAE = {"block_out_channels": [128, 256, 512, 512]}  # FLUX.1-dev's, SD3's, Z-Image's: 8× downsampling


def macro_gin(tmp_path: Path, model: Path | str, name: str) -> Path:
    """A FLUX config ``name.gin`` that names its model through a chain of macros, as the recipes'
    ``%FLUX_PATH`` does."""
    gin = tmp_path / f"{name}.gin"
    gin.write_text(f"include '{ROOT / 'experiments' / 'methods' / 'mixgrpo.gin'}'\n"
                   "TrainConfig.backbone = 'flux'\n"
                   "MODEL_ROOT = %MODEL\n"
                   "FluxBackbone.path = %MODEL_ROOT\n"
                   f"MODEL = '{model}'\n"
                   f"TrainConfig.output_dir = '{tmp_path / 'never'}'\n")
    return gin


def config_only(folder: Path, transformer: dict, vae: dict | None = None) -> Path:
    """A model folder holding config files and no weights: anything that loads from it fails."""
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
    if vae is not None:
        (folder / "vae").mkdir()
        (folder / "vae" / "config.json").write_text(json.dumps(vae))
    return folder


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every way into the model raises, so a refusal that comes back proves it came before loading."""
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the size was refused")

    monkeypatch.setattr(sample, "open_model", never)
    monkeypatch.setattr(DiffusersBackbone, "__init__", never)
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_pretrained", never)


def test_a_size_off_the_models_multiple_is_refused_before_the_model_loads(tmp_path, capsys, flux_dir,  # noqa: F811
                                                                         nothing_loads):
    dev = config_only(tmp_path / "flux-dev", {"_class_name": "FluxTransformer2DModel", "patch_size": 1,
                                              "in_channels": 64}, FLUX_VAE)
    cases = [  # the tiny snapshot's VAE downsamples 2×, then 2×2 patches: multiples of 4
        (flux_gin(tmp_path, flux_dir), ["--height", "30"],
         ["--height 30 is not a multiple of 4", "backbone 'flux'", f"the model in {flux_dir}",
          "pass --height 28 or 32"]),
        (flux_gin(tmp_path, flux_dir), ["--height", "32", "--width", "3"],
         ["--width 3 is not a multiple of 4", "pass --width 4"]),
        (macro_gin(tmp_path, "shipped:shapes-flux", "shapes"), ["--width", "42"],  # pixel space: 4×4 patches
         ["--width 42 is not a multiple of 4", "the model in shipped:shapes-flux", "pass --width 40 or 44"]),
        (macro_gin(tmp_path, dev, "dev"), ["--height", "1000", "--width", "1024"],  # FLUX.1-dev: 8× VAE, then 2×2
         ["--height 1000 is not a multiple of 16", "multiples of 16 pixels", "pass --height 992 or 1008"]),
    ]
    for gin, args, needles in cases:
        rc, _, err = run_cli(capsys, "sample", gin, "--prompts", "a red circle", *args, "--out", tmp_path / "out")
        assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "out").exists()


def test_without_a_rule_before_loading_the_backbone_refuses_the_size_once_loaded(tmp_path, capsys, monkeypatch,
                                                                                 flux_dir):  # noqa: F811
    """A backbone that cannot say its multiple before loading (no ``pixel_multiple``) keeps its own check."""
    monkeypatch.delattr(FluxBackbone, "pixel_multiple")
    rc, _, err = run_cli(capsys, "sample", flux_gin(tmp_path, flux_dir), "--prompts", "a red circle",
                         "--height", "30", "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "height and width must be multiples of 4, got 30×32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cls, build", [
    (FluxBackbone, lambda path: build_tiny_flux(path, patch=2)),  # pixel space, 2×2 patches
    (FluxBackbone, lambda path: build_tiny_flux(path, with_vae=True)),
    (FluxKontextBackbone, build_tiny_kontext),
    (SD3Backbone, build_tiny_sd3),
    (Flux2Backbone, build_tiny_flux2),
    (QwenImageBackbone, build_tiny_qwenimage),
    (ZImageBackbone, build_tiny_zimage),
], ids=["flux-pixels", "flux-vae", "flux_kontext", "sd3", "flux2", "qwenimage", "zimage"])
def test_pixel_multiple_is_what_the_loaded_backbone_demands(tmp_path, cls, build):
    root = build(tmp_path / "model")
    multiple = cls.pixel_multiple(str(root))
    assert multiple in (2, 4)
    with pytest.raises(ValueError, match=rf"multiples of {multiple}\b"):
        cls(str(root), height=multiple + multiple // 2, width=2 * multiple)


def test_pixel_multiple_reads_the_released_models_configs(tmp_path):
    """The released models' configs give the pipelines' multiples (16: an 8× VAE, then 2×2 patches)."""
    flux = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64}
    cases = [
        (FluxBackbone, flux, FLUX_VAE),
        (SD3Backbone, {"_class_name": "SD3Transformer2DModel", "patch_size": 2}, FLUX_VAE),
        (Flux2Backbone, {"_class_name": "Flux2Transformer2DModel", "patch_size": 1}, FLUX_VAE),
        (QwenImageBackbone, {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2},
         {"temperal_downsample": [False, True, True]}),
        (ZImageBackbone, {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2]}, FLUX_VAE),
    ]
    for n, (cls, transformer, vae) in enumerate(cases):
        assert cls.pixel_multiple(config_only(tmp_path / str(n), transformer, vae)) == 16, cls.__name__
    assert FluxBackbone.pixel_multiple("shipped:shapes-flux") == 4  # pixel space, in_channels 48 = 3·4²


def test_pixel_multiple_is_none_where_the_files_do_not_say(tmp_path):
    """Then ``sample`` leaves the size to the backbone's check after loading."""
    flux = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64}
    unreadable = config_only(tmp_path / "unreadable", flux)
    (unreadable / "vae").mkdir()
    (unreadable / "vae" / "config.json").write_text("{not json")
    cases = [
        (FluxBackbone, tmp_path / "missing"),  # loading says the folder does not exist
        (FluxBackbone, config_only(tmp_path / "sd3", {"_class_name": "SD3Transformer2DModel"}, FLUX_VAE)),
        (FluxBackbone, config_only(tmp_path / "no-key", flux, {"latent_channels": 16})),
        (FluxBackbone, unreadable),
        (FluxBackbone, config_only(tmp_path / "odd", {**flux, "in_channels": 50})),  # no vae/: not 3·p²
        (Flux2Backbone, config_only(tmp_path / "flux2", {"_class_name": "Flux2Transformer2DModel"})),
        (SD3Backbone, config_only(tmp_path / "sd3-no-patch", {"_class_name": "SD3Transformer2DModel"}, FLUX_VAE)),
    ]
    for cls, folder in cases:
        assert cls.pixel_multiple(folder) is None, folder
