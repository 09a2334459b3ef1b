"""Image preprocessing of the learned rewards, batched in torch on the reward's device.

Each published scorer receives 8-bit images (PIL images saved from the sampler) and prepares them its
own way; a reward trained on must see the same pixels. Three ways occur among the scorers:

* ``"pil"``: bicubic resize of the 8-bit image as PIL does it (CLIPImageProcessor, which PickScore's and
  CLIP score's recipes use, and torchvision's ``Resize`` on a PIL image, which ImageReward uses). PIL
  resamples in two separable passes (horizontal, then vertical) with a bicubic kernel (a = -0.5) whose
  support is stretched by the downscaling factor (antialiasing), weights normalised to sum 1 and then
  rounded to 22-bit fixed point, and rounds and clips each pass to 8 bits. ``pil_resize`` does exactly
  that with one matrix product per pass; the products are sums of integers below 2^53, so float64
  computes them exactly on any device and the result equals PIL's bit for bit.
* ``"tensor"``: torchvision's ``Resize`` on a float tensor (antialiased bicubic, no rounding): hpsv2
  converts to a tensor before resizing.
* fitting to a square: CLIPImageProcessor and torchvision resize the short side and centre-crop, but
  transformers floors the crop's offset ``(size - crop) / 2`` where torchvision rounds it (half to
  even, Python's ``round``); hpsv2 resizes the long side and pads the short one with black.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import attrs
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PRECISION_BITS = 22  # PIL's fixed point for 8-bit resampling: 32 - 8 - 2 bits


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] → the 0..255 levels (as float) that saving them as 8-bit images gives
    (``round(x · 255)``, as diffusers' ``numpy_to_pil``)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got dtype {images.dtype}")
    return (images.float().clamp(0, 1) * 255).round()


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@lru_cache(maxsize=64)
def _pil_weights(in_size: int, out_size: int) -> torch.Tensor:
    """``[out, in]`` fixed-point bicubic weights of one resampling pass (float64 holding integers)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        k = [_bicubic((j - center + 0.5) / filterscale) for j in range(lo, hi)]
        total = sum(k)
        if total != 0.0:
            k = [v / total for v in k]
        fixed = [int(v * (1 << _PRECISION_BITS) + (0.5 if v >= 0 else -0.5)) for v in k]
        weights[i, lo:hi] = torch.tensor(fixed, dtype=torch.float64)
    return weights


def _pil_pass(levels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One pass along the last axis: round and clip to 8 bits as PIL does."""
    acc = levels @ weights.to(levels.device).T + float(1 << (_PRECISION_BITS - 1))
    return torch.floor(acc / float(1 << _PRECISION_BITS)).clamp_(0, 255)


def pil_resize(levels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """8-bit levels ``[B, C, H, W]`` (any float dtype, integer values) → PIL's bicubic resize to
    ``height × width``, as float64 levels."""
    x = levels.to(torch.float64)
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if w != width:
        x = _pil_pass(x, _pil_weights(w, width))
    if h != height:
        x = _pil_pass(x.transpose(-1, -2), _pil_weights(h, height)).transpose(-1, -2)
    return x


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output size of a resize of the short side to ``size`` (the long side truncated, as both
    torchvision and transformers compute it)."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


@attrs.frozen
class ImageTransform:
    """Fit images to ``size × size`` as a scorer does, then normalise.

    Args:
        size: the model's input resolution.
        resize: ``"pil"`` (PIL's bicubic on 8-bit levels) or ``"tensor"`` (torchvision's antialiased
            bicubic on float pixels); see the module's docstring.
        fit: ``"crop_floor"``: resize the short side to ``size`` (long side truncated) and centre-crop
            with a floored offset (transformers' CLIPImageProcessor); ``"crop_round"``: the same with a
            rounded offset (torchvision's ``Resize`` + ``CenterCrop``); ``"pad"``: resize the long side
            to ``size`` (short side rounded half to even) and pad with black, the odd pixel at the
            bottom/right (hpsv2's ``ResizeMaxSize``).
        mean, std: per-channel normalisation of pixels in [0, 1].
    """

    size: int
    resize: Literal["pil", "tensor"] = "pil"
    fit: Literal["crop_floor", "crop_round", "pad"] = "crop_floor"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __attrs_post_init__(self) -> None:
        if self.resize not in ("pil", "tensor"):
            raise ValueError(f"ImageTransform.resize must be 'pil' or 'tensor', got {self.resize!r}")
        if self.fit not in ("crop_floor", "crop_round", "pad"):
            raise ValueError(f"ImageTransform.fit must be 'crop_floor', 'crop_round' or 'pad', got {self.fit!r}")

    def _resize(self, levels: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        h, w = levels.shape[-2:]
        if self.resize == "pil":
            return (pil_resize(levels, nh, nw) / 255.0).float()
        x = levels / 255.0
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Float images ``[B, 3, H, W]`` in [0, 1] → normalised pixels ``[B, 3, size, size]`` (float32)."""
        levels = to_uint8_levels(images)
        h, w = levels.shape[-2:]
        s = self.size
        if self.fit == "pad":
            scale = s / float(max(h, w))
            if scale == 1.0:
                x = levels / 255.0
            else:
                nh, nw = round(h * scale), round(w * scale)
                x = self._resize(levels, nh, nw)
                ph, pw = s - nh, s - nw
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        else:
            nh, nw = shortest_side_size(h, w, s)
            x = self._resize(levels, nh, nw)
            if self.fit == "crop_floor":
                top, left = (nh - s) // 2, (nw - s) // 2
            else:
                top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
            x = x[..., top: top + s, left: left + s]
        if x.shape[-2:] != (s, s):
            raise ValueError(f"image {h}×{w} cannot be fitted to {s}×{s} (fit={self.fit!r})")
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def check_batch(images: torch.Tensor, prompts, who: str) -> list[str]:
    """Validate a reward call's arguments; returns the prompts as a list."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{who}: {images.shape[0]} images but {len(prompts)} prompts (one prompt per image)")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{who}: prompts must be strings")
    return prompts


def chunks(n: int, size: int) -> list[slice]:
    """Slices of ``range(n)`` in pieces of at most ``size``."""
    size = max(1, int(size))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)] if n else []


__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageTransform", "pil_resize", "shortest_side_size", "to_uint8_levels",
           "check_batch", "chunks"]
