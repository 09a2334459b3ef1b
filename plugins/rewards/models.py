"""Learned reward models: CLIP score, PickScore, HPS-v2.1, ImageReward (ALGORITHMS.md §11).

Weights load from LOCAL paths only (no hub access is attempted); point each reward at a snapshot
you downloaded. CLIP score and PickScore need only transformers: images are resized and normalised
in torch, so torchvision is not required. HPS-v2.1 needs open_clip (and so torchvision), and
ImageReward its own package: install the ``rewards`` extra (``make rewards``) for those two.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _local_dir(path: str | None, what: str) -> Path:
    if not path:
        raise ValueError(f"{what}: set its path to a local snapshot (gin: {what}.path = '/models/...'); "
                         f"mixgrpo never downloads weights")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist (mixgrpo loads weights from local paths only)")
    return p


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] → CLIP pixel values ``[B, 3, size, size]`` (resize the short
    side with bicubic interpolation, centre-crop, normalise), computed in torch."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top: top + size, left: left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIPScoreReward(Reward):
    """Cosine similarity of a CLIP model's image and text embeddings (times ``scale``).

    Args:
        path: local folder of a transformers ``CLIPModel`` with its tokenizer.
        scale: multiplier of the cosine (1 for CLIP score; PickScore uses the model's logit scale).
        device: where the model runs (default: CUDA if available).
    """

    name = "clip_score"

    def __init__(self, path: str | None = None, scale: float = 1.0, device: str | None = None) -> None:
        from transformers import AutoTokenizer, CLIPModel

        folder = _local_dir(path, type(self).__name__)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.scale = scale
        self.image_size = int(self.model.config.vision_config.image_size)

    def _features(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = clip_preprocess(images.to(self.device), self.image_size)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        img = _as_tensor(self.model.get_image_features(pixel_values=pixels))
        txt = _as_tensor(self.model.get_text_features(**tokens))
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        img, txt = self._features(images, prompts)
        return (self.scale * (img * txt).sum(-1)).float().to(images.device)


def _as_tensor(out) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor for get_*_features."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


class PickScoreReward(CLIPScoreReward):
    """PickScore: ``exp(logit_scale)·cos`` of the PickScore_v1 CLIP-H model (≈ 22 on good images).

    Args:
        path: local folder of ``PickScore_v1`` (a CLIPModel) with the CLIP-H tokenizer.
        normalize: return ``(s − 18) / 8`` as MixGRPO trains on (raw s when False).
        device: see ``CLIPScoreReward``.
    """

    name = "pickscore"

    def __init__(self, path: str | None = None, normalize: bool = True, device: str | None = None) -> None:
        super().__init__(path, scale=1.0, device=device)
        self.scale = float(self.model.logit_scale.exp())
        self.normalize = normalize

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        s = super().__call__(images, prompts)
        return (s - 18.0) / 8.0 if self.normalize else s


class HPSv2Reward(Reward):
    """HPS-v2.1: OpenCLIP ViT-H-14 with the HPS v2.1 checkpoint; score = image·text feature dot (≈ 0.3).

    Args:
        checkpoint: local path of ``HPS_v2.1_compressed.pt``.
        clip_weights: local path of the open_clip ViT-H-14 laion2B weights (``open_clip_pytorch_model.bin``).
        device: see ``CLIPScoreReward``.
    """

    name = "hpsv2"

    def __init__(self, checkpoint: str | None = None, clip_weights: str | None = None,
                 device: str | None = None) -> None:
        try:
            import open_clip
        except ImportError as exc:
            raise ImportError("HPSv2Reward needs open_clip (and torchvision): install the rewards extra "
                              "with `make rewards`") from exc
        ckpt = _local_dir(checkpoint, "HPSv2Reward.checkpoint")
        base = _local_dir(clip_weights, "HPSv2Reward.clip_weights")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _, _ = open_clip.create_model_and_transforms("ViT-H-14", pretrained=str(base), device=self.device)
        state = torch.load(ckpt, map_location="cpu")
        model.load_state_dict(state.get("state_dict", state))
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14")
        self.image_size = 224

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.image_size)
        img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return (img * txt).sum(-1).to(images.device)


class ImageRewardReward(Reward):
    """ImageReward-v1.0 (already normalised; ≈ 1 on good images).

    Args:
        checkpoint: local path of ``ImageReward.pt``.
        med_config: local path of its ``med_config.json``.
        device: see ``CLIPScoreReward``.
    """

    name = "imagereward"

    def __init__(self, checkpoint: str | None = None, med_config: str | None = None, device: str | None = None) -> None:
        try:
            import ImageReward as image_reward
        except ImportError as exc:
            raise ImportError("ImageRewardReward needs the image-reward package: `make rewards`") from exc
        ckpt = _local_dir(checkpoint, "ImageRewardReward.checkpoint")
        med = _local_dir(med_config, "ImageRewardReward.med_config")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = image_reward.load(str(ckpt), device=self.device, med_config=str(med))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        out = []
        for img, prompt in zip(images, prompts):
            array = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            out.append(float(self.model.score(prompt, [Image.fromarray(array)])))
        return torch.tensor(out, dtype=torch.float32, device=images.device)


@hookimpl
def register_rewards(register):
    register("clip_score", CLIPScoreReward)
    register("pickscore", PickScoreReward)
    register("hpsv2", HPSv2Reward)
    register("imagereward", ImageRewardReward)
