"""Every method preset trains two iterations of full fine-tuning on the tiny Qwen-Image snapshot
(the checks of test_qwenimage_training.py, split off to keep each file's run short)."""

from __future__ import annotations

import pytest

from mixgrpo.plugins.backbones.tiny_qwenimage import build_tiny_qwenimage
from tests.plugins.test_qwenimage_training import ROLLOUT_NFE, check_two_iterations


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwenimage(tmp_path_factory.mktemp("qwenimage") / "tiny")


@pytest.mark.parametrize("method", sorted(ROLLOUT_NFE))
def test_every_method_trains_two_iterations_in_full(tmp_path, qwen_dir, method):
    check_two_iterations(tmp_path, qwen_dir, method, lora=False)
