"""The LAION aesthetic predictor: CLIP image embedding + its MLP head.

christophschuhmann/improved-aesthetic-predictor (``simple_inference.py``) scores an image by a small
MLP on the L2-normalised CLIP ViT-L/14 image embedding (768 numbers), trained by MSE on the SAC,
LAION-Logos and AVA ratings: ``sac+logos+ava1-l14-linearMSE.pth``, scores ≈ 1..10. DDPO
(``ddpo_pytorch/aesthetic_scorer.py``) and flow_grpo (``flow_grpo/aesthetic_scorer.py``) use it with
transformers' ``openai/clip-vit-large-patch14`` and its ``CLIPProcessor``; so does this reward.

The head is five Linear layers with Dropout between the first four and **no activation** (the
published module's ReLUs are commented out, so the head is an affine map in effect, kept layer by
layer so that the checkpoint loads unchanged)::

    layers.0  Linear(768, 1024)   layers.1  Dropout(0.2)
    layers.2  Linear(1024, 128)   layers.3  Dropout(0.2)
    layers.4  Linear(128, 64)     layers.5  Dropout(0.1)
    layers.6  Linear(64, 16)
    layers.7  Linear(16, 1)

The checkpoint is that module's state dict (``layers.{0,2,4,6,7}.{weight,bias}``); the widths are
read from it, so a head for another CLIP (ViT-B/32's 512 features) loads the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.plugins.rewards.models import (
    ModelReward,
    _features,
    load_state_dict,
    local_path,
    resolve_device,
    resolve_dtype,
)
from mixgrpo.plugins.rewards.preprocess import ImageTransform

#: ``nn.Sequential`` indices of the head's Linear layers; the others are Dropout (identity in eval)
LINEAR_INDICES = (0, 2, 4, 6, 7)
#: Dropout probabilities after the Linear layers at indices 0, 2, 4 (training only; kept for the layout)
_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


def build_head(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The aesthetic MLP in the published layout, its widths read from ``state``, weights loaded."""
    expected = {f"layers.{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"AestheticReward.head is not the LAION aesthetic MLP (sac+logos+ava1-l14-linearMSE.pth): "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")
    layers: list[nn.Module] = []
    for i in range(LINEAR_INDICES[-1] + 1):
        if i in LINEAR_INDICES:
            out_features, in_features = state[f"layers.{i}.weight"].shape
            layers.append(nn.Linear(int(in_features), int(out_features)))
        else:
            layers.append(nn.Dropout(_DROPOUT[i]))
    head = nn.Sequential(*layers)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()}, strict=True)
    if head[-1].out_features != 1:
        raise ValueError(f"AestheticReward.head ends in {head[-1].out_features} outputs; the predictor has 1")
    return head


class AestheticReward(ModelReward):
    """LAION aesthetic score (≈ 1..10; DDPO's ``aesthetic_score``), prompt-independent.

    Images are prepared as CLIPProcessor does (PIL bicubic of the short side, floored centre crop,
    CLIP normalisation, as ``CLIPScoreReward``); the image embedding (``get_image_features``, after
    CLIP's visual projection) is divided by its L2 norm and passed through the head.

    Args:
        clip_path: local folder of a transformers ``CLIPModel`` (``openai/clip-vit-large-patch14``).
        head: local path of the MLP's state dict (``sac+logos+ava1-l14-linearMSE.pth``, or a
            ``.safetensors`` of the same tensors).
        device, dtype, batch_size: see ``CLIPScoreReward``; the head runs in float32.
    """

    name = "aesthetic"
    version = "sac+logos+ava1-l14-linearMSE"

    def __init__(self, clip_path: str | None = None, head: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int = 16) -> None:
        from transformers import CLIPModel

        folder = local_path(clip_path, "AestheticReward.clip_path", file=False)
        head_file = local_path(head, "AestheticReward.head", file=True)
        mlp = build_head(load_state_dict(head_file))  # before the CLIP loads: a wrong file fails fast
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, "AestheticReward")
        clip = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=self.dtype)
        width = int(clip.config.projection_dim)
        if mlp[0].in_features != width:
            raise ValueError(f"AestheticReward.head reads {mlp[0].in_features} features but the CLIP in {folder} "
                             f"embeds images in {width}: pair ViT-L/14 (768) with sac+logos+ava1-l14-linearMSE.pth")
        self.model = clip.to(self.device).eval().requires_grad_(False)
        self.head = mlp.to(self.device).eval().requires_grad_(False)
        self.batch_size = int(batch_size)
        self.transform = ImageTransform(int(clip.config.vision_config.image_size), resize="pil", fit="crop_floor")

    def _score(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        embed = _features(self.model.get_image_features(pixel_values=pixels)).float()
        return self.head(F.normalize(embed, dim=-1)).squeeze(-1)


@hookimpl
def register_rewards(register):
    register("aesthetic", AestheticReward)
