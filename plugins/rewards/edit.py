"""An image-editing reward: how much of the source an edit keeps, and how well it follows the instruction.

``edit_clip`` scores an edited image ``y`` of source ``s`` under instruction ``c`` with one CLIP model:

    score = image_weight · cos(E_img(y), E_img(s)) + text_weight · cos(E_img(y), E_txt(c))

the first term (CLIP image similarity) rewarding edits that keep the source's content, the second
(CLIP score of the instruction) edits that show what was asked. Both images are prepared as CLIP score
prepares its images (``models.CLIPScoreReward``: PIL bicubic of the short side, floored centre crop,
CLIP normalisation). It declares ``uses_source_images``, so the trainer passes the source images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.plugins.rewards.models import CLIPScoreReward, _features
from mixgrpo.plugins.rewards.preprocess import check_batch, chunks


def check_sources(sources: torch.Tensor | None, images: torch.Tensor, who: str) -> torch.Tensor:
    """The source images ``[B, 3, H', W']`` of ``images`` ``[B, 3, H, W]``, or an error naming the fix."""
    if sources is None:
        raise ValueError(f"{who} compares each edited image with its source image: call it with sources= "
                         f"[B, 3, H, W] in [0, 1] (the trainer does, for a reward with uses_source_images)")
    if sources.ndim != 4 or sources.shape[1] != 3 or sources.shape[0] != images.shape[0]:
        raise ValueError(f"{who}: expected sources [{images.shape[0]}, 3, H, W] (one per image), got shape "
                         f"{tuple(sources.shape)}")
    return sources


class EditCLIPReward(CLIPScoreReward):
    """CLIP image similarity to the source plus the instruction's CLIP score (module docstring).

    Args:
        path: local folder of a transformers ``CLIPModel`` with its tokenizer.
        image_weight: weight of ``cos(E_img(edited), E_img(source))``.
        text_weight: weight of ``cos(E_img(edited), E_txt(instruction))``.
        device, dtype, batch_size: see ``CLIPScoreReward``.
    """

    name = "edit_clip"
    uses_source_images = True

    def __init__(self, path: str | None = None, image_weight: float = 0.5, text_weight: float = 0.5,
                 device: str | None = None, dtype: str | None = None, batch_size: int = 16) -> None:
        weights = {"image_weight": image_weight, "text_weight": text_weight}
        for key, value in weights.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"EditCLIPReward.{key} must be a finite number >= 0, got {value!r}")
        if image_weight == 0 and text_weight == 0:
            raise ValueError("EditCLIPReward.image_weight and text_weight are both 0: the reward would score every "
                             "edit 0; give at least one a positive weight")
        self.image_weight, self.text_weight = float(image_weight), float(text_weight)
        super().__init__(path, scale=1.0, device=device, dtype=dtype, batch_size=batch_size)

    def _edit_score(self, pixels: torch.Tensor, source: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores ``[b]`` of prepared edited images and sources ``[b, 3, S, S]`` (model dtype)."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        edited = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        kept = F.normalize(_features(self.model.get_image_features(pixel_values=source)).float(), dim=-1)
        text = F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)
        return self.image_weight * (edited * kept).sum(-1) + self.text_weight * (edited * text).sum(-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 sources: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[B]`` float32 of edited images ``[B, 3, H, W]`` in [0, 1] under their instructions,
        against their source images ``sources`` ``[B, 3, H', W']`` in [0, 1] (any size: both are fitted
        to CLIP's input)."""
        who = type(self).__name__
        prompts = check_batch(images, prompts, who)
        sources = check_sources(sources, images, who)
        out = [torch.zeros(0)]
        for part in chunks(len(prompts), self.batch_size):
            pixels = self.transform(images[part].to(self.device)).to(self.dtype)
            source = self.transform(sources[part].to(self.device)).to(self.dtype)
            out.append(self._edit_score(pixels, source, prompts[part]).float().cpu())
        return torch.cat(out).to(images.device)


@hookimpl
def register_rewards(register):
    register("edit_clip", EditCLIPReward)
