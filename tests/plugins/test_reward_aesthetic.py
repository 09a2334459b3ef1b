"""The LAION aesthetic predictor on a tiny random CLIP and a random head saved in the published layout,
against a float64 re-derivation: transformers' own CLIP image processor on PIL images, the raw
CLIPModel in float64, the L2 norm and the head's five affine maps written out with torch ops."""

import gin
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mixgrpo.core.plugins import PluginManager
from mixgrpo.plugins.rewards.aesthetic import AestheticReward, build_head
from mixgrpo.testing.rewards import RewardContract

from .reward_refs import PROMPTS, as_tensor, make_tiny_clip, textured_images


def published_module(width: int) -> nn.Sequential:
    """The MLP of improved-aesthetic-predictor's simple_inference.py, layer for layer (no activations)."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class Published(nn.Module):
    """Holds the MLP as ``self.layers``, so that its state dict has the published keys."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = published_module(width)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    clip = make_tiny_clip(root / "clip", seed=2)  # projection_dim 16
    torch.manual_seed(3)
    head = root / "sac+logos+ava1-tiny.pth"
    state = Published(16).state_dict()
    state["layers.7.weight"] *= 300  # a random head's scores hardly differ; spread them to the scale of 1..10
    torch.save(state, head)
    return clip, head


def _reference(clip_dir, head_path, arrays) -> np.ndarray:
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(clip_dir).double().eval()
    pixels = CLIPImageProcessorPil()(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
    state = {k: v.double() for k, v in torch.load(head_path, weights_only=True).items()}
    with torch.no_grad():
        embed = model.get_image_features(pixel_values=pixels.double())
        embed = getattr(embed, "pooler_output", embed)
        x = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # Dropout is the identity at inference
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1).numpy()


@pytest.mark.parametrize("size", [(720, 720), (448, 454)], ids=["720x720", "448x454"])
def test_equals_the_float64_rederivation(models, size):
    clip, head = models
    arrays = textured_images([size] * 3, seed=5)
    want = _reference(clip, head, arrays)
    got = AestheticReward(str(clip), str(head), device="cpu", batch_size=2)(as_tensor(arrays), PROMPTS[:3])
    assert got.dtype == torch.float32 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    assert np.ptp(want) > 0.1  # the images are told apart far beyond the tolerance


def test_the_score_ignores_the_prompt(models):
    clip, head = models
    reward = AestheticReward(str(clip), str(head), device="cpu")
    images = as_tensor(textured_images([(64, 64)] * 2, seed=6))
    assert torch.equal(reward(images, ["a cat", "a dog"]), reward(images, ["", "something else entirely"]))


def test_a_head_in_the_published_shapes_loads_unchanged(tmp_path):
    torch.manual_seed(0)
    module = Published(768)  # sac+logos+ava1-l14-linearMSE.pth: ViT-L/14's 768 features
    torch.save(module.state_dict(), tmp_path / "head.pth")
    head = build_head(torch.load(tmp_path / "head.pth", weights_only=True))
    assert [tuple(m.weight.shape) for m in head if isinstance(m, nn.Linear)] == [
        (1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    x = torch.randn(4, 768)
    module.eval(), head.eval()
    assert torch.equal(head(x), module.layers(x))


def test_wrong_files_are_refused_before_the_clip_loads(models, tmp_path):
    clip, head = models
    wrong = tmp_path / "wrong.pth"
    torch.save({"0.weight": torch.zeros(1, 16), "0.bias": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not the LAION aesthetic MLP"):
        AestheticReward(str(clip), str(wrong), device="cpu")
    wide = tmp_path / "wide.pth"
    torch.save(Published(768).state_dict(), wide)
    with pytest.raises(ValueError, match="reads 768 features but the CLIP .* embeds images in 16"):
        AestheticReward(str(clip), str(wide), device="cpu")
    with pytest.raises(ValueError, match=r"AestheticReward\.clip_path is not set"):
        AestheticReward(None, str(head))
    with pytest.raises(FileNotFoundError, match=r"AestheticReward\.head = .* does not exist"):
        AestheticReward(str(clip), str(tmp_path / "missing.pth"))


def test_built_by_name_from_gin(models):
    clip, head = models
    pm = PluginManager()
    gin.parse_config([f"AestheticReward.clip_path = '{clip}'", f"AestheticReward.head = '{head}'",
                      "AestheticReward.device = 'cpu'"])
    try:
        assert isinstance(pm.create("reward", "aesthetic"), AestheticReward)
    finally:
        gin.clear_config()


class TestAestheticContract(RewardContract):
    @pytest.fixture(autouse=True)
    def _models(self, models):
        self.paths = models

    def make_reward(self):
        clip, head = self.paths
        return AestheticReward(str(clip), str(head), device="cpu", batch_size=3)
