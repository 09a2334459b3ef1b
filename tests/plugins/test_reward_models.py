"""The four learned rewards on tiny random models, against each package's own scorer.

Each model is built by the code that builds the real one (transformers' CLIPModel; hpsv2's own
open_clip factory; ImageReward's own class), saved as its checkpoint is published, loaded by the
reward plugin from local paths and scored on the same images and prompts as the reference scorer:
the published PickScore / CLIP-score recipe, ``hpsv2.img_score.score``, ``ImageReward.score``.
"""

import gin
import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.core.plugins import PluginManager
from mixgrpo.plugins.rewards.imagereward import ImageRewardReward
from mixgrpo.plugins.rewards.models import CLIPScoreReward, HPSv2Reward, PickScoreReward

from .reward_refs import (
    PROMPTS,
    as_tensor,
    hpsv2_reference,
    make_tiny_clip,
    make_tiny_hps,
    make_tiny_imagereward,
    textured_images,
)

# A batch of 720×720 images (square, as FLUX samples) and one of 448×454 (odd crop margin).
SQUARE = textured_images([(720, 720)] * 4, seed=11)
ODD = textured_images([(448, 454)] * 3, seed=12)
TOL = 1e-5


def _spread(scores) -> float:
    return float(np.ptp(np.asarray(scores, dtype=np.float64)))


# -- CLIP score and PickScore ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=1)


def _clip_recipe(folder, images, prompts, logit_scale: bool) -> list[float]:
    """The published PickScore recipe (CLIP score is the same without the logit scale): transformers'
    processor (PIL backend), one prompt against its images, normalised embeddings."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(folder).eval()
    processor, tokenizer = CLIPImageProcessorPil(), AutoTokenizer.from_pretrained(folder)
    out = []
    with torch.no_grad():
        for array, prompt in zip(images, prompts):
            image_inputs = processor(images=[Image.fromarray(array)], return_tensors="pt")
            text_inputs = tokenizer(prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs)
            text_embs = model.get_text_features(**text_inputs)
            image_embs = getattr(image_embs, "pooler_output", image_embs)
            text_embs = getattr(text_embs, "pooler_output", text_embs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scale = model.logit_scale.exp() if logit_scale else 1.0
            out.append(float((scale * (text_embs @ image_embs.T))[0, 0]))
    return out


@pytest.mark.parametrize("images", [SQUARE, ODD], ids=["720x720", "448x454"])
def test_pickscore_equals_the_published_recipe(clip_dir, images):
    prompts = PROMPTS[: len(images)]
    ref = _clip_recipe(clip_dir, images, prompts, logit_scale=True)
    raw = PickScoreReward(str(clip_dir), normalize=False, device="cpu")(as_tensor(images), prompts)
    assert raw.dtype == torch.float32 and raw.shape == (len(images),)
    assert np.abs(raw.numpy() - ref).max() < TOL * 20  # scores ≈ 20 × cos
    assert _spread(ref) > 0.05  # the images and prompts are told apart: the comparison means something
    trained = PickScoreReward(str(clip_dir), device="cpu")(as_tensor(images), prompts)
    assert np.abs(trained.numpy() - (np.asarray(ref) - 18.0) / 8.0).max() < TOL * 5


def test_clip_score_equals_the_recipe(clip_dir):
    ref = _clip_recipe(clip_dir, SQUARE, PROMPTS[:4], logit_scale=False)
    ours = CLIPScoreReward(str(clip_dir), device="cpu")(as_tensor(SQUARE), PROMPTS[:4])
    assert np.abs(ours.numpy() - ref).max() < TOL
    assert _spread(ref) > 0.01


def test_batching_dtype_and_no_grad(clip_dir):
    """Batches of any size give the same scores; scores are float32 on the images' device with no
    graph; the model runs in its configured dtype."""
    images = as_tensor(SQUARE).requires_grad_(True)
    whole = PickScoreReward(str(clip_dir), device="cpu", batch_size=16)(images, PROMPTS[:4])
    split = PickScoreReward(str(clip_dir), device="cpu", batch_size=3)(images, PROMPTS[:4])
    assert torch.allclose(whole, split, atol=1e-5) and not whole.requires_grad
    half = PickScoreReward(str(clip_dir), device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    low = half(images, PROMPTS[:4])
    assert low.dtype == torch.float32 and (low - whole).abs().max() < 0.1  # bf16 rounding only
    assert torch.equal(PickScoreReward(str(clip_dir), device="cpu")(images[:0], []), torch.zeros(0))


def test_rewards_are_created_by_name_from_gin(clip_dir):
    pm = PluginManager()
    gin.parse_config([f"PickScoreReward.path = '{clip_dir}'", "PickScoreReward.batch_size = 2"])
    reward = pm.create("reward", "pickscore")
    assert isinstance(reward, PickScoreReward) and reward.batch_size == 2


def test_bad_configuration_says_what_to_do(clip_dir, tmp_path):
    with pytest.raises(ValueError, match=r"PickScoreReward\.path is not set.*never downloads"):
        PickScoreReward(None)
    with pytest.raises(FileNotFoundError, match="local paths only"):
        PickScoreReward(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dtype"):
        CLIPScoreReward(str(clip_dir), dtype="float8")
    reward = CLIPScoreReward(str(clip_dir), device="cpu")
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(as_tensor(SQUARE), PROMPTS[:3])


# -- HPS-v2.1 -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    return make_tiny_hps(tmp_path_factory.mktemp("hps"), seed=2)


@pytest.mark.parametrize("images", [SQUARE, ODD, textured_images([(512, 768)] * 2, seed=13)],
                         ids=["720x720", "448x454", "512x768"])
def test_hpsv2_equals_hpsv2_score(hps, images):
    ckpt, config = hps
    prompts = PROMPTS[: len(images)]
    ref = hpsv2_reference(ckpt, config, images, prompts)
    ours = HPSv2Reward(str(ckpt), architecture=str(config), device="cpu", batch_size=2)(as_tensor(images), prompts)
    assert np.abs(ours.numpy() - ref).max() < TOL
    assert _spread(ref) > 0.01


def test_hpsv2_in_bfloat16(hps):
    ckpt, config = hps
    full = HPSv2Reward(str(ckpt), architecture=str(config), device="cpu")(as_tensor(ODD), PROMPTS[:3])
    half = HPSv2Reward(str(ckpt), architecture=str(config), device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    low = half(as_tensor(ODD), PROMPTS[:3])
    assert low.dtype == torch.float32 and (low - full).abs().max() < 0.03


def test_hpsv2_refuses_a_checkpoint_of_another_model(hps, tmp_path):
    ckpt, config = hps
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    state.pop("logit_scale")
    broken = tmp_path / "broken.pt"
    torch.save({"state_dict": state}, broken)
    with pytest.raises(ValueError, match="does not fit"):
        HPSv2Reward(str(broken), architecture=str(config), device="cpu")
    with pytest.raises(ValueError, match="not an open_clip model"):
        HPSv2Reward(str(ckpt), architecture="ViT-Z-99", device="cpu")
    with pytest.raises(ValueError, match=r"HPSv2Reward\.checkpoint is not set"):
        HPSv2Reward(None)


# -- ImageReward --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagereward(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield make_tiny_imagereward(tmp_path_factory.mktemp("imagereward"), seed=3, monkeypatch=mp)


@pytest.mark.parametrize("images", [SQUARE, ODD], ids=["720x720", "448x454"])
def test_imagereward_equals_imagereward_score(imagereward, images):
    ckpt, med, tokenizer, scorer = imagereward
    prompts = PROMPTS[: len(images)]
    prompts[-1] = prompts[-1] + " [ENC]"  # a special token BLIP added to the tokenizer
    with torch.no_grad():
        ref = [scorer.score(p, Image.fromarray(a)) for a, p in zip(images, prompts)]
    reward = ImageRewardReward(str(ckpt), str(med), str(tokenizer), vision_heads=2, device="cpu", batch_size=2)
    ours = reward(as_tensor(images), prompts)
    assert np.abs(ours.numpy() - ref).max() < TOL
    assert _spread(ref) > 0.01


def test_imagereward_in_bfloat16(imagereward):
    ckpt, med, tokenizer, _ = imagereward
    args = (str(ckpt), str(med), str(tokenizer))
    full = ImageRewardReward(*args, vision_heads=2, device="cpu")(as_tensor(ODD), PROMPTS[:3])
    half = ImageRewardReward(*args, vision_heads=2, device="cpu", dtype="bfloat16")
    assert next(half.text.parameters()).dtype == torch.bfloat16
    low = half(as_tensor(ODD), PROMPTS[:3])
    assert low.dtype == torch.float32 and (low - full).abs().max() < 0.1


def test_imagereward_needs_each_local_file(imagereward, tmp_path):
    ckpt, med, tokenizer, _ = imagereward
    with pytest.raises(ValueError, match=r"ImageRewardReward\.tokenizer is not set"):
        ImageRewardReward(str(ckpt), str(med), None)
    with pytest.raises(FileNotFoundError, match="must be a file"):
        ImageRewardReward(str(tmp_path), str(med), str(tokenizer))
    other = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match="is it ImageReward.pt"):
        ImageRewardReward(str(other), str(med), str(tokenizer))
