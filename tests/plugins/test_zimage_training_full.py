"""Every method preset fine-tunes the whole tiny Z-Image transformer for 2 iterations (the checks of
``test_zimage_training.py``: first ratio 1, NFE with both guidance branches, weights moved)."""

from __future__ import annotations

import pytest

from mixgrpo.plugins.backbones.tiny_zimage import build_tiny_zimage

from .test_zimage_training import METHODS, train_two_iterations, zimage


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    return build_tiny_zimage(tmp_path_factory.mktemp("zimage") / "tiny")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fine_tunes_two_iterations(zimage_dir, tmp_path, method):
    train_two_iterations(tmp_path, method, zimage(zimage_dir, lora=False), lora=False)
