"""ImageReward-v1.0 on transformers' BLIP classes, loaded from the published ``ImageReward.pt``.

ImageReward is BLIP's image-grounded text encoder: a ViT (``blip.visual_encoder``) encodes the image,
a BERT with cross-attention to the image tokens (``blip.text_encoder``, configured by
``med_config.json``) encodes the prompt, and an MLP head (``mlp.layers``) maps the prompt's first
token to a raw score, standardised with the training set's mean and std. transformers' ``BlipVisionModel``
and ``BlipTextModel`` have the same layers; ``convert_state_dict`` renames the checkpoint's tensors
to them. The ``image-reward`` package itself is not needed (its module imports break on transformers
5); the tests compare this reward with that package's own scorer on the same tiny checkpoint.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from mixgrpo.plugins.rewards.models import ModelReward, load_state_dict, local_path, resolve_device, resolve_dtype
from mixgrpo.plugins.rewards.preprocess import ImageTransform

#: ImageReward-v1.0 standardises the MLP's output with these (its training set's mean and std).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: ImageReward tokenizes prompts to 35 tokens (padded and truncated).
PROMPT_TOKENS = 35

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``ImageReward.pt`` tensors → ``{"vision": ..., "text": ..., "head": ...}`` state dicts of
    ``BlipVisionModel``, ``BlipTextModel`` and the MLP head (an ``nn.Sequential`` of its Linear layers)."""
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    linear_index: dict[str, int] = {}
    head_keys = sorted({k.split(".")[2] for k in state if k.startswith("mlp.layers.")}, key=int)
    linear_index = {k: i for i, k in enumerate(head_keys)}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, repl in _VISION_RENAMES:
                name, n = re.subn(pattern, repl, name)
                if n:
                    break
            else:
                raise ValueError(f"ImageReward checkpoint: unknown vision tensor {key!r}")
            out["vision"][name] = value
        elif key.startswith("blip.text_encoder."):
            name = key[len("blip.text_encoder."):]
            if name != "embeddings.position_ids":
                out["text"][name] = value
        elif key.startswith("mlp.layers."):
            _, _, idx, param = key.split(".")
            out["head"][f"{linear_index[idx]}.{param}"] = value
        # blip.vision_proj / blip.text_proj (contrastive heads) and other leftovers are not used in scoring
    for part in ("vision", "text", "head"):
        if not out[part]:
            raise ValueError(f"ImageReward checkpoint holds no {part} tensors: is it ImageReward.pt?")
    return out


def _vision_config(vision: dict[str, torch.Tensor], heads: int | None):
    from transformers import BlipVisionConfig

    patch = vision["embeddings.patch_embedding.weight"]
    width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    positions = int(vision["embeddings.position_embedding"].shape[1]) - 1
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise ValueError(f"ImageReward checkpoint: {positions} patch positions do not form a square grid")
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=depth, num_attention_heads=heads or width // 64,  # BLIP's ViT-B/L: 64 per head
        image_size=grid * patch_size, patch_size=patch_size, layer_norm_eps=1e-6, hidden_act="gelu")


def _text_config(med_config: dict, vision_width: int):
    from transformers import BlipTextConfig

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "layer_norm_eps", "pad_token_id")
    missing = [k for k in keys[:5] if k not in med_config]
    if missing:
        raise ValueError(f"ImageRewardReward.med_config lacks {missing}: is it ImageReward's med_config.json?")
    kwargs = {k: med_config[k] for k in keys if k in med_config}
    return BlipTextConfig(**kwargs, encoder_hidden_size=vision_width, is_decoder=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class ImageRewardReward(ModelReward):
    """ImageReward-v1.0 (standardised; ≈ 1 on good images, 0 on average).

    Images are prepared as the package's scorer does (torchvision's ``Resize`` on PIL images, i.e.
    PIL's bicubic, a rounded centre-crop offset, CLIP normalisation); prompts are tokenized by
    bert-base-uncased, padded and truncated to 35 tokens.

    Args:
        checkpoint: local path of ``ImageReward.pt``.
        med_config: local path of its ``med_config.json``.
        tokenizer: local folder of the ``bert-base-uncased`` tokenizer (``vocab.txt``).
        vision_heads: attention heads of the ViT (default: width / 64, as BLIP's ViT-L of v1.0).
        device, dtype, batch_size: see ``CLIPScoreReward``.
    """

    name = "imagereward"
    version = "v1.0"

    def __init__(self, checkpoint: str | None = None, med_config: str | None = None, tokenizer: str | None = None,
                 vision_heads: int | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 16) -> None:
        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

        ckpt = local_path(checkpoint, "ImageRewardReward.checkpoint", file=True)
        med = local_path(med_config, "ImageRewardReward.med_config", file=True)
        tok = local_path(tokenizer, "ImageRewardReward.tokenizer", file=False)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, "ImageRewardReward")
        self.batch_size = int(batch_size)

        parts = convert_state_dict(load_state_dict(ckpt))
        vision_cfg = _vision_config(parts["vision"], vision_heads)
        self.vision = BlipVisionModel(vision_cfg)
        self.vision.load_state_dict(parts["vision"], strict=True)
        self.text = BlipTextModel(_text_config(json.loads(med.read_text()), vision_cfg.hidden_size),
                                  add_pooling_layer=False)
        self.text.load_state_dict(parts["text"], strict=True)
        shapes = [(parts["head"][f"{i}.weight"].shape) for i in range(len(parts["head"]) // 2)]
        self.head = nn.Sequential(*[nn.Linear(int(s[1]), int(s[0])) for s in shapes])
        self.head.load_state_dict(parts["head"], strict=True)
        for module in (self.vision, self.text, self.head):
            module.to(self.device, self.dtype).eval().requires_grad_(False)

        self.tokenizer = BertTokenizer.from_pretrained(str(tok), local_files_only=True)
        # ImageReward's BLIP adds these two special tokens to bert-base-uncased; prompts that spell them
        # must tokenize as the scorer does.
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.transform = ImageTransform(int(vision_cfg.image_size), resize="pil", fit="crop_round")

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                return_tensors="pt").to(self.device)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=self.device)
        text = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask,
                         is_decoder=False).last_hidden_state
        raw = self.head(text[:, 0].to(self.dtype)).float().squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD
