"""The rewards' image preprocessing against each scorer's own, pixel for pixel on the same images."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mixgrpo.plugins.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform, pil_resize

from .reward_refs import as_tensor, load_hpsv2_scorer, load_imagereward_scorer, load_torchvision, textured_images

# 720×720 (the measurement), 448×454 (a centre crop with an odd margin of 3: transformers
# floors it to 1, torchvision rounds it to 2), a landscape and a portrait image, and one smaller than
# the model's input (upscaled).
SIZES = [(720, 720), (448, 454), (512, 768), (777, 500), (150, 190)]


@pytest.mark.parametrize("shape", [(720, 720, 224, 224), (64, 80, 37, 46), (512, 768, 224, 336),
                                   (100, 90, 224, 201), (33, 700, 224, 4751)])
def test_pil_resize_equals_pil_bit_for_bit(shape):
    h, w, oh, ow = shape
    rng = np.random.default_rng(h * w)
    for array in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), textured_images([(h, w)], seed=w)[0]):
        ref = np.asarray(Image.fromarray(array).resize((ow, oh), Image.BICUBIC)).astype(np.float64)
        ours = pil_resize(torch.from_numpy(array).permute(2, 0, 1)[None].float(), oh, ow)[0].permute(1, 2, 0)
        assert np.array_equal(ours.numpy(), ref)


def _ours(transform: ImageTransform, array: np.ndarray) -> torch.Tensor:
    return transform(as_tensor([array]))[0]


@pytest.mark.parametrize("size", SIZES)
def test_clip_preprocessing_equals_clip_image_processor(size):
    """CLIPImageProcessor with its PIL backend: what PickScore's and CLIP score's recipes call."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    array = textured_images([size], seed=sum(size))[0]
    ref = CLIPImageProcessorPil()(images=[Image.fromarray(array)], return_tensors="pt")["pixel_values"][0]
    ours = _ours(ImageTransform(224, resize="pil", fit="crop_floor"), array)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().max().item() < 1e-5
    if size == (720, 720):  # the old preprocessing (bicubic without antialiasing) was far off
        x = F.interpolate(as_tensor([array]), size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
        old = (x[0] - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
        assert (old - ref).abs().max().item() > 0.5


@pytest.mark.parametrize("size", SIZES)
def test_imagereward_preprocessing_equals_its_transform(size):
    scorer = load_imagereward_scorer()
    array = textured_images([size], seed=sum(size) + 1)[0]
    ref = scorer._transform(224)(Image.fromarray(array))
    ours = _ours(ImageTransform(224, resize="pil", fit="crop_round"), array)
    assert (ours - ref).abs().max().item() < 1e-5
    if size == (448, 454):  # the crop offset rule matters here, and the test sees it
        floored = _ours(ImageTransform(224, resize="pil", fit="crop_floor"), array)
        assert (floored - ref).abs().max().item() > 0.1


@pytest.mark.parametrize("size", SIZES)
def test_hpsv2_preprocessing_equals_its_transform(size):
    """hpsv2's scorer builds its transform with light_augmentation=True: tensor first, then the long
    side resized (antialiased bicubic on floats) and the short side padded with black."""
    load_hpsv2_scorer()
    from hpsv2.src.open_clip.transform import image_transform

    array = textured_images([size], seed=sum(size) + 2)[0]
    ref = image_transform(224, is_train=False, resize_longest_max=True)(Image.fromarray(array))
    ours = _ours(ImageTransform(224, resize="tensor", fit="pad"), array)
    assert (ours - ref).abs().max().item() < 1e-5


def test_torchvision_resize_of_pil_images_is_pil():
    """ImageReward's transform resizes PIL images with torchvision, i.e. with PIL itself."""
    tv = load_torchvision()
    from torchvision.transforms import InterpolationMode, Resize

    array = textured_images([(300, 410)], seed=5)[0]
    ref = np.asarray(Resize(224, interpolation=InterpolationMode.BICUBIC)(Image.fromarray(array)))
    ours = pil_resize(torch.from_numpy(array).permute(2, 0, 1)[None].float(), 224, 306)[0].permute(1, 2, 0)
    assert tv.__version__ and np.array_equal(ours.numpy(), ref.astype(np.float64))


def test_bad_images_are_refused_with_the_fix():
    t = ImageTransform(224)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        t(torch.rand(3, 64, 64))
    with pytest.raises(TypeError, match="float images"):
        t(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="fit must be"):
        ImageTransform(224, fit="stretch")
