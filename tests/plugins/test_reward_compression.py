"""DDPO's JPEG rewards against PIL encoding the same 8-bit images, and their direction."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.core.plugins import PluginManager
from mixgrpo.plugins.rewards.compression import JPEGCompressibilityReward, JPEGIncompressibilityReward
from mixgrpo.testing.rewards import RewardContract

from .reward_refs import as_tensor, textured_images


def _pil_kb(array: np.ndarray, quality: int = 95) -> float:
    """The reference: DDPO's recipe written out with numpy and PIL on an ``H×W×3`` uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000


def _uint8(images: torch.Tensor) -> list[np.ndarray]:
    # numpy's rounding (half to even) as DDPO's torch .round(); the images below sit on exact levels
    return [np.clip(np.round(a * 255), 0, 255).astype(np.uint8) for a in images.permute(0, 2, 3, 1).numpy()]


def test_sizes_equal_pil_on_the_same_8bit_images():
    images = as_tensor(textured_images([(64, 96)] * 3, seed=3))
    want = [_pil_kb(a) for a in _uint8(images)]
    got = JPEGIncompressibilityReward()(images, ["a", "b", "c"])
    assert got.dtype == torch.float32 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    neg = JPEGCompressibilityReward()(images, ["a", "b", "c"])
    np.testing.assert_allclose(neg.numpy(), -np.asarray(want), rtol=1e-6)
    assert len(set(want)) == 3  # three different sizes: the comparison tells the images apart


def test_quality_and_scale_reach_the_encoder():
    images = as_tensor(textured_images([(48, 48)] * 2, seed=4))
    got = JPEGCompressibilityReward(quality=50, scale=1 / 500)(images, ["a", "b"])  # flow_grpo's scaling
    want = [-_pil_kb(a, quality=50) / 500 for a in _uint8(images)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert (JPEGIncompressibilityReward(quality=50)(images, ["a", "b"]) <
            JPEGIncompressibilityReward(quality=95)(images, ["a", "b"])).all()


def test_a_flat_image_is_more_compressible_than_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    c = JPEGCompressibilityReward()
    flat_score, noise_score = c(flat, ["x"]).item(), c(noise, ["x"]).item()
    assert flat_score > noise_score
    assert -flat_score < 1.5 and -noise_score > 5  # a few hundred bytes of headers vs. ~10 kB of noise


def test_float_levels_are_rounded_like_saving_the_sample():
    # 0.5 · 255 = 127.5 → 128, as diffusers' numpy_to_pil rounds; a value nudged below 127.5 gives 127
    a = JPEGIncompressibilityReward()(torch.full((1, 3, 16, 16), 0.5), ["x"])
    b = _pil_kb(np.full((16, 16, 3), 128, np.uint8))
    assert a.item() == pytest.approx(b, rel=1e-6)


def test_bad_configuration_is_refused_with_the_binding():
    with pytest.raises(ValueError, match=r"JPEGCompressibilityReward\.quality must be an integer in 1\.\.100"):
        JPEGCompressibilityReward(quality=0)
    with pytest.raises(ValueError, match=r"JPEGIncompressibilityReward\.scale must be > 0"):
        JPEGIncompressibilityReward(scale=0.0)


def test_registered_under_ddpo_names():
    pm = PluginManager()
    assert isinstance(pm.create("reward", "jpeg_compressibility"), JPEGCompressibilityReward)
    assert isinstance(pm.create("reward", "jpeg_incompressibility"), JPEGIncompressibilityReward)


class TestCompressibilityContract(RewardContract):
    def make_reward(self):
        return JPEGCompressibilityReward()


class TestIncompressibilityContract(RewardContract):
    def make_reward(self):
        return JPEGIncompressibilityReward()
