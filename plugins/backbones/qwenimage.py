"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``) as a mixgrpo backbone, loaded from a local
directory laid out as the Qwen/Qwen-Image snapshot (``QwenImagePipeline.save_pretrained``)::

    transformer/    QwenImageTransformer2DModel                        required
    text_encoder/   Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL-7B)  required
    tokenizer/      its tokenizer (Qwen2Tokenizer)                     required
    vae/            AutoencoderKLQwenImage (per-channel mean and std)   required
    scheduler/      FlowMatchEulerDiscreteScheduler config             optional (the σ shift's mu)
    mixgrpo.json    {"height": ..., "width": ...} default image size   optional

Prompts are encoded as ``QwenImagePipeline`` does: each is put in Qwen-Image's chat template, the
text encoder's last hidden states are taken at the valid tokens, the template's 34-token system
prefix is dropped and at most ``max_sequence_length`` tokens are kept. Here every prompt is then
padded to exactly ``max_sequence_length`` tokens with zeros and a False mask (the pipeline pads to
the longest prompt of its batch; the transformer masks the padding out of its joint attention, so
the values are the same and a prompt's features never depend on its batch).

Latents are kept unpacked ``[B, C, h, w]`` (C = the VAE's ``z_dim``, h = H / 8 for Qwen-Image); the
transformer sees them packed into 2×2 patches (``[B, (h/2)(w/2), 4C]``, as ``_pack_latents``) with
``img_shapes = (1, h/2, w/2)`` and the timestep σ. Guidance is the pipeline's ``true_cfg_scale``:
classifier-free guidance against a negative prompt (``" "``, the model card's), the guided velocity
rescaled per image token to the conditional velocity's norm (``combine_guidance``). ``decode`` undoes the
VAE's per-channel normalization (``to_vae_latents``) and decodes a one-frame video (``vae_decode``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import ModelFacts
from mixgrpo.core.types import Conditioning
from mixgrpo.plugins.backbones import resolve_model_path, sizes
from mixgrpo.plugins.backbones.diffusers_base import (
    DiffusersBackbone,
    check_model_class,
    component,
    read_defaults,
    resolve_dtype,
)
from mixgrpo.plugins.backbones.flux import pack, unpack

log = logging.getLogger(__name__)

#: QwenImagePipeline's chat template and the number of its leading tokens it drops (the system
#: prompt, ``<|im_start|>user\n`` included) from the text encoder's output
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TEMPLATE_DROP = 34
#: the pipeline refuses longer prompts (``max_sequence_length`` must be <= 1024)
MAX_SEQUENCE_LENGTH = 1024
#: the dual-stream blocks' attention projections (image and text stream) and both streams' MLPs
QWENIMAGE_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                          "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                          "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
#: Qwen/Qwen-Image's scheduler/scheduler_config.json, used when a snapshot has no scheduler/
SCHEDULER_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
                      "shift_terminal": 0.02}
REQUIRED = {"transformer": "transformer", "text_encoder": "Qwen2.5-VL text encoder", "tokenizer": "tokenizer",
            "vae": "VAE"}


def image_seq_mu(image_seq_len: int, scheduler: dict) -> float:
    """The pipeline's resolution-dependent shift ``mu`` (``calculate_shift``): linear in the number of
    image tokens between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``.
    Qwen-Image at 512² (1024 tokens): 0.5387; at 1328² (6889 tokens): 0.8343."""
    cfg = {**SCHEDULER_DEFAULTS, **scheduler}
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return cfg["base_shift"] + slope * (image_seq_len - cfg["base_image_seq_len"])


def strip_template(hidden: torch.Tensor, mask: torch.Tensor, drop: int,
                   length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's features as the pipeline keeps them, padded to exactly ``length`` tokens.

    Args:
        hidden: text-encoder states ``[B, L, D]``; mask: ``[B, L]`` bool, True at valid tokens (on
            either side of the padding, as the pipeline's ``_extract_masked_hidden``).
        drop: leading valid tokens to drop (the template's prefix); length: tokens kept per prompt.
    Returns:
        ``embeds`` ``[B, length, D]`` (zeros after a prompt's end) and ``mask`` ``[B, length]`` bool.
    """
    embeds = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1])
    keep = torch.zeros(hidden.shape[0], length, dtype=torch.bool, device=hidden.device)
    for row in range(hidden.shape[0]):
        valid = hidden[row][mask[row]][drop:drop + length]
        embeds[row, :valid.shape[0]] = valid
        keep[row, :valid.shape[0]] = True
    return embeds, keep


def rescaled_guidance(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG on packed velocities ``[B, tokens, features]``: ``v_u + s·(v_c − v_u)``,
    rescaled per token to the norm of ``v_c`` over its features (so guidance turns the velocity but
    does not lengthen it)."""
    guided = v_uncond + scale * (v_cond - v_uncond)
    return guided * (v_cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))


def check_snapshot(path: str) -> Path:
    """The snapshot folder, refused before any weight loads when it lacks a component or holds
    another model family's transformer (the message names the backbone that loads it)."""
    root = resolve_model_path(path, QwenImageBackbone.model_name)
    for name, what in REQUIRED.items():
        component(root, name, f"Qwen-Image {what}")
    check_model_class(root / "transformer", QwenImageBackbone.transformer_class, QwenImageBackbone.family)
    return root


class QwenImageBackbone(DiffusersBackbone):
    """Qwen-Image from a local diffusers-format directory (laid out as the module docstring says).

    Args: those of ``DiffusersBackbone``, and
        height, width: default ``mixgrpo.json`` in ``path``, else 1024 (the pipeline's default; the
            model card recommends 1328×1328 for 1:1). Multiples of 2× the VAE's downsampling (16).
        cfg_scale: the pipeline's ``true_cfg_scale``, default 4 (the model card's and FlowGRPO's);
            guidance against ``negative_prompt`` with the norm rescaling (``rescaled_guidance``).
        negative_prompt: default ``" "`` (the model card's: a single space turns guidance on).
        max_sequence_length: text tokens per prompt after the template prefix (the pipeline's
            default 512; at most 1024).
        lora_targets: default the blocks' attention projections of both streams and both MLPs.
        vae_dtype: dtype of the VAE (default: ``dtype``).
    """

    family, model_name = "qwenimage", "Qwen-Image"
    transformer_class, diffusers_pipeline = "QwenImageTransformer2DModel", "QwenImagePipeline"
    default_lora_targets = QWENIMAGE_LORA_TARGETS

    def __init__(self, path: str, height: int | None = None, width: int | None = None,
                 dtype: str = "float32", cfg_scale: float = 4.0, cfg_gradient: str = "conditional",
                 negative_prompt: str = " ", timestep_quantization: int | None = None,
                 max_sequence_length: int = 512, lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] | None = None, gradient_checkpointing: bool = False,
                 vae_dtype: str | None = None, attention_backend: str | None = None,
                 compile: str = "none", device: str | None = None) -> None:  # noqa: A002 (gin name)
        if not 1 <= int(max_sequence_length) <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be in 1..{MAX_SEQUENCE_LENGTH} (QwenImagePipeline's limit), "
                             f"got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = str(negative_prompt)
        self.vae_dtype = vae_dtype
        check_snapshot(path)
        super().__init__(path, height, width, dtype=dtype, cfg_scale=cfg_scale, cfg_gradient=cfg_gradient,
                         timestep_quantization=timestep_quantization, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                         attention_backend=attention_backend, compile=compile, device=device)
        self._freeze_discarded_text_output()

    def _freeze_discarded_text_output(self) -> None:
        """The transformer drops the text stream after its last block, so that block's text output
        projection and text MLP (their LoRA adapters under LoRA) never reach the velocity: they are
        frozen, which keeps them out of the optimizer (weight decay would move them for nothing) and
        keeps DDP from waiting for gradients that never come."""
        last = f"transformer_blocks.{self.config.num_layers - 1}."
        for name, param in self.module.named_parameters():
            dead = any(f"{last}{part}." in name for part in ("attn.to_add_out", "txt_mlp"))
            if dead and param.requires_grad:
                param.requires_grad_(False)

    def _load_components(self, root: Path, load: dict) -> None:
        from diffusers import AutoencoderKLQwenImage
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder", **load)
        self.vae = AutoencoderKLQwenImage.from_pretrained(root / "vae", local_files_only=True,
                                                          dtype=resolve_dtype(self.vae_dtype or self.dtype))
        self.frozen = {"text_encoder": self.text_encoder, "vae": self.vae}
        width = self.text_encoder.config.get_text_config().hidden_size
        if width != self.config.joint_attention_dim:
            raise ValueError(f"{root}: the transformer's joint_attention_dim is {self.config.joint_attention_dim} "
                             f"but the text encoder's hidden states have {width} features")
        file = root / "scheduler" / "scheduler_config.json"
        self.scheduler_config = {**SCHEDULER_DEFAULTS, **(json.loads(file.read_text()) if file.is_file() else {})}

    @classmethod
    def pixel_multiple(cls, path: str | Path) -> int | None:
        """The multiple of pixels ``height`` and ``width`` must be, 2× the VAE's downsampling
        (``2 ** len(temperal_downsample)``, then 2×2 patches), read from the config files of the model
        folder ``path`` before anything loads (``sizes``); None when they do not say, and
        ``_set_latent_layout`` checks after loading."""
        root = sizes.model_folder(path)
        cfg = sizes.transformer_config(root, cls.transformer_class) if root else None
        vae = sizes.read_config(root, "vae") if root else None
        stages = vae.get("temperal_downsample") if vae else None
        if cfg is None or cfg.get("patch_size") != 2 or not isinstance(stages, list):
            return None
        return 2 * 2 ** len(stages)

    def _set_latent_layout(self, root: Path, height: int | None, width: int | None) -> None:
        cfg, vae_cfg = self.config, self.vae.config
        if cfg.patch_size != 2 or cfg.in_channels != 4 * vae_cfg.z_dim or cfg.out_channels != vae_cfg.z_dim:
            raise ValueError(f"{root}: the transformer (patch {cfg.patch_size}, in/out channels {cfg.in_channels}/"
                             f"{cfg.out_channels}) does not fit the VAE's {vae_cfg.z_dim} latent channels packed 2×2")
        self.channels = vae_cfg.z_dim
        self.vae_scale_factor = 2 ** len(vae_cfg.temperal_downsample)  # the pipeline's formula
        defaults = read_defaults(root)
        self.height = int(height or defaults.get("height", 1024))
        self.width = int(width or defaults.get("width", 1024))
        step = 2 * self.vae_scale_factor
        if self.height % step or self.width % step:
            raise ValueError(f"height and width must be multiples of {step}, got {self.height}×{self.width}")
        self.latent_height = self.height // self.vae_scale_factor
        self.latent_width = self.width // self.vae_scale_factor

    # -- the σ grid -----------------------------------------------------------------------------
    def image_seq_len(self) -> int:
        """Image tokens the transformer sees (2×2 patches of the latent)."""
        return (self.latent_height // 2) * (self.latent_width // 2)

    def mu(self) -> float:
        """The pipeline's dynamic-shift ``mu`` at this resolution (``TrainConfig.mu`` with
        ``TrainConfig.grid = 'dynamic'`` walks the pipeline's grid, without its ``shift_terminal``)."""
        return image_seq_mu(self.image_seq_len(), self.scheduler_config)

    def pipeline_mu(self, num_steps: int | None = None) -> float:
        """``Backbone.pipeline_mu``: ``mu()``, whatever ``num_steps``."""
        return self.mu()

    # -- the Backbone interface ----------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        return (self.channels, self.latent_height, self.latent_width)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts → ``Conditioning``: ``embeds`` ``[B, max_sequence_length, joint_attention_dim]``
        (the text encoder's last hidden states after the template prefix, zero-padded), ``mask``
        ``[B, max_sequence_length]`` bool, no pooled features."""
        device = self._sync_devices()
        texts = [PROMPT_TEMPLATE.format(p) for p in prompts]
        length = PROMPT_TEMPLATE_DROP + self.max_sequence_length
        # causal attention: a prompt's first tokens do not see the ones truncation removes
        too_long = [p for p, ids in zip(prompts, self.tokenizer(texts)["input_ids"], strict=True) if len(ids) > length]
        if too_long:
            log.warning("%d prompt(s) truncated to %d tokens, e.g. %r", len(too_long), self.max_sequence_length,
                        too_long[0])
        tokens = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = tokens["attention_mask"].to(device)
        out = self.text_encoder(input_ids=tokens["input_ids"].to(device), attention_mask=mask,
                                output_hidden_states=True)
        embeds, keep = strip_template(out.hidden_states[-1], mask.bool(), PROMPT_TEMPLATE_DROP,
                                      self.max_sequence_length)
        return Conditioning(embeds=embeds.to(self.dtype), mask=keep)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return pack(x, 2)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpack(tokens, self.channels, self.latent_height, self.latent_width, 2)

    # -- the hooks of DiffusersBackbone ------------------------------------------------------------
    def _text_inputs(self, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds, mask)``: the transformer masks the padding out of its joint attention."""
        return cond.embeds.to(self.device, self.dtype), cond.mask.to(self.device)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One transformer call on latents packed into 2×2 patches ``[B, tokens, 4C]`` (model dtype), the
        output unpacked; ``t`` is σ."""
        tokens = self.pack(x)
        shape = (1, self.latent_height // 2, self.latent_width // 2)
        out = self._network()(hidden_states=tokens, timestep=t.to(self.dtype), encoder_hidden_states=embeds,
                              encoder_hidden_states_mask=mask, img_shapes=[[shape]] * tokens.shape[0],
                              return_dict=False)[0]
        return self.unpack(out)

    def combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The pipeline's true CFG, ``rescaled_guidance`` on the packed velocities (per image token); under
        ``cfg_gradient="conditional"`` the gradient flows through ``v_c`` in both the combination and the
        rescaling."""
        return self.unpack(rescaled_guidance(self.pack(v_uncond), self.pack(v_cond), self.cfg_scale))

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and std, ``[1, C, 1, 1]`` like ``like``."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``z·std + mean`` per channel (as the pipeline divides by ``1/std``)."""
        mean, std = self._latent_stats(latents)
        return latents / (1.0 / std) + mean

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``(z − mean) / std`` per channel."""
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE decodes a one-frame video."""
        return self.vae.decode(z[:, :, None], return_dict=False)[0][:, :, 0]

    def vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE encodes a one-frame video (the posterior's mode)."""
        return self.vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]

    # -- publishing ----------------------------------------------------------------------------
    def model_facts(self) -> ModelFacts:
        """QwenImagePipeline's ``guidance_scale`` is for guidance-distilled models only (ignored by
        Qwen-Image); its CFG is ``true_cfg_scale`` with a negative prompt."""
        return attrs.evolve(super().model_facts(), guidance=None)

    def load_snippet(self, export_dir: str, prompt: str, num_steps: int) -> list[str]:
        """The shared snippet, drawing with the negative prompt and ``true_cfg_scale``."""
        lines = super().load_snippet(export_dir, prompt, num_steps)
        cfg = f", negative_prompt={self.negative_prompt!r}, true_cfg_scale={self.cfg_scale}"
        return [line.replace(").images[0]", f"{cfg}).images[0]") if line.startswith("image = pipe(") else line
                for line in lines]


@hookimpl
def register_backbones(register):
    register("qwenimage", QwenImageBackbone)
