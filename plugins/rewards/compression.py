"""JPEG compressibility and incompressibility rewards (DDPO's tasks).

DDPO (Black et al. 2023, kvablack/ddpo-pytorch, ``ddpo_pytorch/rewards.py``) rewards the size of the
image as a JPEG file: the sample is converted to 8 bits (``round(x · 255)``), encoded by PIL at
``quality=95``, and its size in kB (bytes / 1000, decimal) is the score of ``jpeg_incompressibility``;
``jpeg_compressibility`` is the same size negated, so that training makes files smaller. flow_grpo
(``flow_grpo/rewards.py``) divides the negated size by 500 for its compressibility task; bind
``JPEGCompressibilityReward.scale = 0.002`` to reproduce that.

The size depends on the encoder (libjpeg's version and settings that PIL links), not on a model: the
tests compare with PIL encoding the same 8-bit image, and check the direction (a flat image is far
more compressible than noise).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Reward
from mixgrpo.plugins.rewards.preprocess import check_batch, to_uint8_levels

#: DDPO's JPEG quality (``image.save(buffer, format="JPEG", quality=95)``).
DDPO_QUALITY = 95


def jpeg_kilobytes(levels: torch.Tensor, quality: int = DDPO_QUALITY) -> float:
    """The size in kB (bytes / 1000) of one image of 8-bit levels ``[3, H, W]`` encoded as JPEG by PIL."""
    from PIL import Image

    array = levels.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.tell() / 1000.0


class JPEGIncompressibilityReward(Reward):
    """The JPEG size of each image in kB (DDPO's ``jpeg_incompressibility``): larger is better.

    Prompts are ignored (the task has none), but one prompt per image is still required, as for
    every reward.

    Args:
        quality: the JPEG quality PIL encodes at (DDPO: 95), 1..100.
        scale: multiplier of the size (1: kB as DDPO reports it).
    """

    name = "jpeg_incompressibility"
    version = "ddpo-q95"
    #: +1: the size itself; the compressibility reward negates it
    sign: float = 1.0

    def __init__(self, quality: int = DDPO_QUALITY, scale: float = 1.0) -> None:
        who = type(self).__name__
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"{who}.quality must be an integer in 1..100 (DDPO uses 95), got {quality!r}")
        if not scale > 0:
            raise ValueError(f"{who}.scale must be > 0 (1 gives kB), got {scale!r}")
        self.quality, self.scale = int(quality), float(scale)
        if (self.quality, self.scale) != (DDPO_QUALITY, 1.0):
            self.version = f"q{self.quality}-x{self.scale:g}"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → ``[B]`` float32 sizes in kB (× sign × scale)."""
        check_batch(images, prompts, type(self).__name__)
        levels = to_uint8_levels(images).cpu()
        sizes = [jpeg_kilobytes(img, self.quality) for img in levels]
        return (self.sign * self.scale * torch.tensor(sizes, dtype=torch.float64)).float().to(images.device)


class JPEGCompressibilityReward(JPEGIncompressibilityReward):
    """Minus the JPEG size in kB (DDPO's ``jpeg_compressibility``): smaller files score higher.

    The score is negated rather than declared ``higher_is_better = False`` so that its values, the
    metrics and the evaluations read as DDPO's do.
    """

    name = "jpeg_compressibility"
    sign = -1.0


@hookimpl
def register_rewards(register):
    register("jpeg_compressibility", JPEGCompressibilityReward)
    register("jpeg_incompressibility", JPEGIncompressibilityReward)
