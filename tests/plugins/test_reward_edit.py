"""``edit_clip`` on a tiny random CLIP: against a float64 re-derivation with transformers' own CLIP
processor, the reward contract with source images, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.scoring import call_reward
from mixgrpo.core.types import EditPrompt
from mixgrpo.plugins.rewards import edit
from mixgrpo.plugins.rewards.edit import EditCLIPReward
from mixgrpo.testing import RewardContract

from .reward_refs import PROMPTS, as_tensor, make_tiny_clip, textured_images

EDITED = textured_images([(64, 96)] * 4, seed=21)
SOURCES = textured_images([(80, 48)] * 4, seed=22)  # another size and aspect ratio than the edits


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=3)


def reference(folder, edited, sources, prompts, image_weight, text_weight) -> np.ndarray:
    """The score re-derived in float64: transformers' CLIP processor (PIL) on each 8-bit image, the
    model in double precision, normalised features, the weighted sum of the two cosines."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(folder).double().eval()
    processor, tokenizer = CLIPImageProcessorPil(), AutoTokenizer.from_pretrained(folder)

    def unit(features):
        features = getattr(features, "pooler_output", features)
        return features / features.norm(dim=-1, keepdim=True)

    out = []
    with torch.no_grad():
        for y, s, prompt in zip(edited, sources, prompts, strict=True):
            pixels = processor(images=[Image.fromarray(y), Image.fromarray(s)], return_tensors="pt")["pixel_values"]
            images = unit(model.get_image_features(pixel_values=pixels.double()))
            text = unit(model.get_text_features(**tokenizer(prompt, padding=True, truncation=True, max_length=77,
                                                            return_tensors="pt")))
            out.append(image_weight * float(images[0] @ images[1]) + text_weight * float(images[0] @ text[0]))
    return np.asarray(out)


@pytest.mark.parametrize("weights", [(0.3, 0.7), (1.0, 0.0), (0.0, 2.0)])
def test_equals_the_float64_rederivation(clip_dir, weights):
    prompts = PROMPTS[:4]
    expected = reference(clip_dir, EDITED, SOURCES, prompts, *weights)
    reward = EditCLIPReward(str(clip_dir), *weights, device="cpu")
    ours = reward(as_tensor(EDITED), prompts, sources=as_tensor(SOURCES))
    assert ours.dtype == torch.float32 and ours.shape == (4,)
    assert np.abs(ours.numpy() - expected).max() < 1e-5, (ours, expected)
    assert np.ptp(expected) > 100 * 1e-5  # the samples are told apart: the comparison means something


def test_the_source_term_rewards_keeping_the_source(clip_dir):
    """An 'edit' that returns the source unchanged scores image similarity 1 exactly (cos of equal
    features); another image scores less."""
    reward = EditCLIPReward(str(clip_dir), image_weight=1.0, text_weight=0.0, device="cpu")
    sources = as_tensor(SOURCES)
    kept = reward(sources, PROMPTS[:4], sources=sources)
    torch.testing.assert_close(kept, torch.ones(4), atol=1e-5, rtol=0)
    changed = reward(as_tensor(EDITED), PROMPTS[:4], sources=sources)
    assert (changed < 0.999).all()


def test_scored_through_the_core_with_edit_prompts(clip_dir, tmp_path):
    """The trainer's call: the core reads each EditPrompt's image at the generated size and passes it."""
    paths = []
    for n, array in enumerate(SOURCES):
        paths.append(tmp_path / f"{n}.png")
        Image.fromarray(array).save(paths[-1])
    prompts = [EditPrompt(p, path) for p, path in zip(PROMPTS[:4], paths, strict=True)]
    pm = PluginManager()  # edit_clip directly until pyproject registers it, then as registered
    pm = pm if "edit_clip" in pm.names("reward") else PluginManager(plugins=[edit])
    reward = pm.create("reward", "edit_clip", path=str(clip_dir), device="cpu")
    images = as_tensor(EDITED)
    scores = call_reward(reward, "edit_clip", images, prompts)
    resized = torch.stack([p.pixels(64, 96) for p in prompts])  # what the core passes: the images' size
    torch.testing.assert_close(scores, reward(images, PROMPTS[:4], sources=resized), atol=0, rtol=0)
    assert torch.isfinite(scores).all()


def test_bad_input_says_what_to_do(clip_dir, tmp_path):
    missing = str(tmp_path / "no_clip")  # the weights are checked before the model folder is
    with pytest.raises(ValueError, match=r"EditCLIPReward\.image_weight must be a finite number >= 0"):
        EditCLIPReward(missing, image_weight=-1.0)
    with pytest.raises(ValueError, match="both 0"):
        EditCLIPReward(missing, image_weight=0.0, text_weight=0.0)
    with pytest.raises(FileNotFoundError, match="local paths only"):
        EditCLIPReward(missing)
    reward = EditCLIPReward(str(clip_dir), device="cpu")
    with pytest.raises(ValueError, match="call it with sources="):
        reward(as_tensor(EDITED), PROMPTS[:4])
    with pytest.raises(ValueError, match=r"expected sources \[4, 3, H, W\]"):
        reward(as_tensor(EDITED), PROMPTS[:4], sources=as_tensor(SOURCES)[:3])


class TestEditCLIPContract(RewardContract):
    @pytest.fixture(autouse=True)
    def _model(self, clip_dir):
        self.path = str(clip_dir)

    def make_reward(self):
        return EditCLIPReward(self.path, image_weight=0.4, text_weight=0.6, device="cpu", batch_size=2)

    def make_sources(self, images):
        return as_tensor(textured_images([(40, 56)] * images.shape[0], seed=23))


def test_an_edit_reward_with_plain_prompts_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """edit_clip scores against the source image: with the shapes prompt set (plain text) the run
    stops at the checks, before the backbone or the CLIP model is built."""
    import gin

    from mixgrpo.core import plugins
    from mixgrpo.core.config import TrainConfig, parse_gin
    from mixgrpo.core.trainer import Trainer

    original = plugins.PluginManager.create

    def no_models(self, kind, name, **kwargs):
        if kind in ("backbone", "reward"):
            raise AssertionError(f"{kind} {name!r} was built before the check")
        return original(self, kind, name, **kwargs)

    monkeypatch.setattr(plugins.PluginManager, "create", no_models)
    gin.clear_config()
    from pathlib import Path

    toy = Path(__file__).resolve().parents[2] / "experiments" / "runs" / "toy_smoke.gin"
    parse_gin([toy], ["TrainConfig.rewards = {'edit_clip': 1.0}",
                   f"EditCLIPReward.path = '{tmp_path}'", f"TrainConfig.output_dir = '{tmp_path / 'run'}'"])
    try:
        with pytest.raises(ValueError, match="score each image against its source image.*plain text prompts"):
            Trainer(TrainConfig())
    finally:
        gin.clear_config()
