"""Learned reward models: CLIP score, PickScore, HPS-v2.1, ImageReward (docs/algorithms.md §11).

Every reward loads from LOCAL paths only (nothing is downloaded), runs on its own device (a reward
model may sit on another GPU than the policy), in ``no_grad``, in the model's dtype, in batches of
``batch_size``, and prepares images exactly as its published scorer does (``preprocess.py``; the
tests compare each reward with that scorer on the same model and images). CLIP score, PickScore and
ImageReward need only transformers; HPS-v2.1 needs open_clip (and so torchvision): the ``rewards``
extra. See docs/rewards.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Reward
from mixgrpo.plugins.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform, check_batch, chunks

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


#: A recipe's default for a setting the user must bind: ``'unset:MACRO'`` names the gin macro to bind
#: (experiments/flux/rewards.gin). A value, unlike ``%gin.REQUIRED``, lets the recipe parse, and the
#: reward that needs it says which macro is missing.
UNSET = "unset:"


def require_set(value, what: str) -> None:
    """Raise, naming the gin macro, when a recipe's ``'unset:MACRO'`` placeholder was not bound."""
    if isinstance(value, str) and value.startswith(UNSET):
        macro = value[len(UNSET):]
        raise ValueError(f"gin macro {macro} is not set (it gives {what}): pass --gin \"{macro} = '...'\" "
                         f"or bind it in your gin file")


def local_path(path: str | None, what: str, *, file: bool | None = None) -> Path:
    """A local file or folder the user bound in gin; a clear error when it is unset or missing."""
    require_set(path, what)
    if not path:
        raise ValueError(f"{what} is not set: bind it to a local path (gin: {what} = '/models/...'); "
                         f"mixgrpo never downloads weights")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} = {path!r} does not exist (mixgrpo loads weights from local paths only)")
    if file is True and not p.is_file():
        raise FileNotFoundError(f"{what} = {path!r} is a folder; it must be a file")
    if file is False and not p.is_dir():
        raise FileNotFoundError(f"{what} = {path!r} is a file; it must be a folder")
    return p


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str | torch.dtype | None, what: str) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"{what}.dtype = {dtype!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (``.safetensors`` or a torch file holding tensors only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


class ModelReward(Reward):
    """Shared call path: validate, then per batch preprocess on the reward's device, cast to the
    model's dtype and score in ``no_grad``; float32 scores come back on the images' device."""

    #: identifies the scoring recipe (reported by ``serve-reward``); bump it when scores change.
    version: str = "1"
    transform: ImageTransform
    device: torch.device
    dtype: torch.dtype
    batch_size: int

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts, type(self).__name__)
        out = [torch.zeros(0)]
        for part in chunks(len(prompts), self.batch_size):
            pixels = self.transform(images[part].to(self.device)).to(self.dtype)
            out.append(self._score(pixels, prompts[part]).float().cpu())
        return torch.cat(out).to(images.device)


def _features(out) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor for get_*_features."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


class CLIPScoreReward(ModelReward):
    """Cosine similarity of a CLIP model's image and text embeddings (times ``scale``).

    Images are prepared as CLIPImageProcessor does (PIL bicubic of the short side, floored centre
    crop, CLIP normalisation); prompts are tokenized with padding and truncation to the text model's
    length, as the CLIP-score and PickScore recipes do.

    Args:
        path: local folder of a transformers ``CLIPModel`` with its tokenizer.
        scale: multiplier of the cosine (1 for CLIP score).
        device: where the model runs (default: CUDA if available); may differ from the policy's.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``.
        batch_size: images per forward pass.
    """

    name = "clip_score"

    def __init__(self, path: str | None = None, scale: float = 1.0, device: str | None = None,
                 dtype: str | None = None, batch_size: int = 16) -> None:
        from transformers import AutoTokenizer, CLIPModel

        who = type(self).__name__
        folder = local_path(path, f"{who}.path", file=False)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, who)
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=self.dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.scale = float(scale)
        self.batch_size = int(batch_size)
        self.transform = ImageTransform(int(self.model.config.vision_config.image_size), resize="pil", fit="crop_floor")

    def _cosine(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        img = _features(self.model.get_image_features(pixel_values=pixels)).float()
        txt = _features(self.model.get_text_features(**tokens)).float()
        return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.scale * self._cosine(pixels, prompts)


class PickScoreReward(CLIPScoreReward):
    """PickScore: ``exp(logit_scale)·cos`` of the PickScore_v1 CLIP-H model (≈ 22 on good images).

    Args:
        path: local folder of ``PickScore_v1`` (a CLIPModel) with the CLIP-H tokenizer files beside it.
        normalize: return ``(s − 18) / 8`` as MixGRPO trains on (raw s when False).
        device, dtype, batch_size: see ``CLIPScoreReward``.
    """

    name = "pickscore"

    def __init__(self, path: str | None = None, normalize: bool = True, device: str | None = None,
                 dtype: str | None = None, batch_size: int = 16) -> None:
        super().__init__(path, scale=1.0, device=device, dtype=dtype, batch_size=batch_size)
        self.scale = float(self.model.logit_scale.float().exp())
        self.normalize = normalize

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        s = self.scale * self._cosine(pixels, prompts)
        return (s - 18.0) / 8.0 if self.normalize else s


class HPSv2Reward(ModelReward):
    """HPS-v2.1: an OpenCLIP ViT-H-14 holding the HPS v2.1 weights; score = dot product of the
    normalised image and text features (≈ 0.3 on good images).

    As hpsv2's scorer does, the image is converted to a float tensor before it is resized (torchvision's
    antialiased bicubic) so that its LONG side fits, padded with black to a square and normalised with
    CLIP's statistics. The checkpoint holds every weight of the model, so no base CLIP weights are needed.

    Args:
        checkpoint: local path of ``HPS_v2.1_compressed.pt`` (or a ``.safetensors`` of the same tensors).
        architecture: an open_clip model name (``ViT-H-14``) or the path of an open_clip model-config
            JSON file (its file name, without ``.json``, becomes the model name).
        device, dtype, batch_size: see ``CLIPScoreReward``.
    """

    name = "hpsv2"
    version = "v2.1"

    def __init__(self, checkpoint: str | None = None, architecture: str = "ViT-H-14", device: str | None = None,
                 dtype: str | None = None, batch_size: int = 16) -> None:
        try:
            import open_clip
        except ImportError as exc:
            raise ImportError("HPSv2Reward needs open_clip (and torchvision): pip install -e '.[rewards]' "
                              "(see docs/rewards.md)") from exc
        ckpt = local_path(checkpoint, "HPSv2Reward.checkpoint", file=True)
        arch = architecture
        if arch.endswith(".json"):
            cfg = local_path(arch, "HPSv2Reward.architecture", file=True)
            open_clip.add_model_config(cfg)
            arch = cfg.stem
        if arch not in open_clip.list_models():
            raise ValueError(f"HPSv2Reward.architecture = {architecture!r} is not an open_clip model "
                             f"(HPS-v2.1 is 'ViT-H-14')")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, "HPSv2Reward")
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        missing, unexpected = model.load_state_dict(load_state_dict(ckpt), strict=False)
        if missing or unexpected:
            raise ValueError(f"HPSv2Reward.checkpoint {ckpt} does not fit {arch}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        self.transform = ImageTransform(int(size[0] if isinstance(size, tuple | list) else size),
                                        resize="tensor", fit="pad", mean=CLIP_MEAN, std=CLIP_STD)
        self.batch_size = int(batch_size)

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.model.encode_image(pixels).float()
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
        return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@hookimpl
def register_rewards(register):
    from mixgrpo.plugins.rewards.imagereward import ImageRewardReward

    register("clip_score", CLIPScoreReward)
    register("pickscore", PickScoreReward)
    register("hpsv2", HPSv2Reward)
    register("imagereward", ImageRewardReward)
