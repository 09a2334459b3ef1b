"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``) as a mixgrpo backbone, as FlowGRPO uses it.

Loaded from a local diffusers-format directory::

    transformer/                   SD3Transformer2DModel                   required
    text_encoder/, tokenizer/      CLIPTextModelWithProjection (CLIP-L)    required
    text_encoder_2/, tokenizer_2/  CLIPTextModelWithProjection (bigG)      required
    text_encoder_3/, tokenizer_3/  T5EncoderModel                          optional (zeros if absent)
    vae/                           AutoencoderKL (scaling and shift factor) required

Prompts are encoded as ``StableDiffusion3Pipeline`` does: the penultimate hidden states of both
CLIP encoders, concatenated along features and zero-padded to the T5 width, then concatenated with
the T5 sequence along tokens; the pooled features are both CLIP projections concatenated. Latents
stay unpacked ``[B, C, H/f, W/f]`` (f = the VAE's downsampling, 8 for SD3); the transformer patches
them itself and takes the timestep ``σ·1000``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.types import Conditioning
from mixgrpo.plugins.backbones import sizes
from mixgrpo.plugins.backbones.diffusers_base import (
    DiffusersBackbone,
    component,
    read_defaults,
    resolve_dtype,
    tokenize,
)

# FlowGRPO's SD3.5 LoRA targets: the joint attention's image and text projections.
SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


class SD3Backbone(DiffusersBackbone):
    """Stable Diffusion 3 / 3.5 from a local diffusers-format directory.

    Args: those of ``DiffusersBackbone`` (``path`` laid out as the module docstring says), and
        height, width: default ``mixgrpo.json`` in ``path``, else ``transformer.config.sample_size ×
            VAE factor`` (1024 for SD3.5; FlowGRPO trains at 512). Multiples of ``VAE factor ×
            patch_size``.
        cfg_scale: default 4.5 (FlowGRPO's).
        timestep_quantization: the network takes ``σ·1000`` (quantized: ``floor(q·σ)/q·1000``).
        max_sequence_length: T5 tokens per prompt (256, the pipeline's default). Without
            ``text_encoder_3/`` that many zero tokens stand in for T5, as in the pipeline.
        lora_targets: default FlowGRPO's eight attention projections.
        vae_dtype: dtype of the VAE (default: ``dtype``); FlowGRPO decodes in ``"float32"``, which
            its SD3.5 recipe sets: the rewards then score images free of bf16 decoding error.
    """

    family, model_name = "sd3", "SD3"
    transformer_class, diffusers_pipeline = "SD3Transformer2DModel", "StableDiffusion3Pipeline"
    default_lora_targets = SD3_LORA_TARGETS
    compile_blocks = ("JointTransformerBlock",)  # diffusers 0.42's SD3 declares no _repeated_blocks

    def __init__(self, path: str, height: int | None = None, width: int | None = None,
                 dtype: str = "float32", cfg_scale: float = 4.5, cfg_gradient: str = "conditional",
                 timestep_quantization: int | None = None,
                 max_sequence_length: int = 256, lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] | None = None, gradient_checkpointing: bool = False,
                 vae_dtype: str | None = None, attention_backend: str | None = None,
                 compile: str = "none", device: str | None = None) -> None:  # noqa: A002 (gin name)
        self.max_sequence_length = int(max_sequence_length)
        self.vae_dtype = vae_dtype
        super().__init__(path, height, width, dtype=dtype, cfg_scale=cfg_scale, cfg_gradient=cfg_gradient,
                         timestep_quantization=timestep_quantization, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                         attention_backend=attention_backend, compile=compile, device=device)

    def _load_components(self, root: Path, load: dict) -> None:
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        self.tokenizers, self.clip_encoders = [], []
        for suffix in ("", "_2"):
            self.tokenizers.append(AutoTokenizer.from_pretrained(
                component(root, f"tokenizer{suffix}", "CLIP tokenizer"), local_files_only=True))
            self.clip_encoders.append(CLIPTextModelWithProjection.from_pretrained(
                component(root, f"text_encoder{suffix}", "CLIP text encoder"), **load))
        self.frozen = {"text_encoder": self.clip_encoders[0], "text_encoder_2": self.clip_encoders[1]}
        self.tokenizer_3 = self.text_encoder_3 = None
        if component(root, "text_encoder_3", "T5", required=False):
            self.tokenizer_3 = AutoTokenizer.from_pretrained(component(root, "tokenizer_3", "T5 tokenizer"),
                                                             local_files_only=True)
            self.text_encoder_3 = T5EncoderModel.from_pretrained(root / "text_encoder_3", **load)
            self.frozen["text_encoder_3"] = self.text_encoder_3
        self.vae = AutoencoderKL.from_pretrained(component(root, "vae", "VAE"), local_files_only=True,
                                                 dtype=resolve_dtype(self.vae_dtype or self.dtype))
        self.frozen["vae"] = self.vae
        self._check_dims(root)

    def _check_dims(self, root: Path) -> None:
        cfg = self.config
        hidden = sum(e.config.hidden_size for e in self.clip_encoders)
        pooled = sum(e.config.projection_dim for e in self.clip_encoders)
        if pooled != cfg.pooled_projection_dim:
            raise ValueError(f"{root}: the transformer's pooled_projection_dim is {cfg.pooled_projection_dim} but "
                             f"the two CLIP projections give {pooled}")
        if hidden > cfg.joint_attention_dim:
            raise ValueError(f"{root}: the CLIP hidden states ({hidden} features together) do not fit the "
                             f"transformer's joint_attention_dim {cfg.joint_attention_dim}")
        if self.text_encoder_3 is not None and self.text_encoder_3.config.d_model != cfg.joint_attention_dim:
            raise ValueError(f"{root}: the transformer's joint_attention_dim is {cfg.joint_attention_dim} but T5 "
                             f"(text_encoder_3) has d_model {self.text_encoder_3.config.d_model}")
        lengths = []
        for tok, enc in zip(self.tokenizers, self.clip_encoders, strict=True):
            limit, tok_max = enc.config.max_position_embeddings, tok.model_max_length
            lengths.append(min(limit, tok_max) if tok_max and tok_max < 10**6 else limit)
        self.clip_length = min(lengths)  # both CLIP sequences are concatenated feature-wise

    @classmethod
    def pixel_multiple(cls, path: str | Path) -> int | None:
        """The multiple of pixels ``height`` and ``width`` must be, the VAE's downsampling times the
        transformer's patch size, read from the config files of the model folder ``path`` before
        anything loads (``sizes``); None when they do not say, and ``_set_latent_layout`` checks after
        loading."""
        root = sizes.model_folder(path)
        cfg = sizes.transformer_config(root, cls.transformer_class) if root else None
        patch = sizes.positive_int(cfg.get("patch_size")) if cfg else None
        scale = sizes.vae_downsampling(root) if patch else None
        return scale * patch if scale and patch else None

    def _set_latent_layout(self, root: Path, height: int | None, width: int | None) -> None:
        cfg, vae_cfg = self.config, self.vae.config
        if vae_cfg.latent_channels != cfg.in_channels or cfg.out_channels != cfg.in_channels:
            raise ValueError(f"{root}: transformer in/out channels {cfg.in_channels}/{cfg.out_channels} do not "
                             f"match the VAE's {vae_cfg.latent_channels} latent channels")
        self.channels = cfg.in_channels
        self.vae_scale_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        defaults = read_defaults(root)
        fallback = cfg.sample_size * self.vae_scale_factor
        self.height = int(height or defaults.get("height", fallback))
        self.width = int(width or defaults.get("width", fallback))
        step = self.vae_scale_factor * cfg.patch_size
        if self.height % step or self.width % step:
            raise ValueError(f"height and width must be multiples of {step}, got {self.height}×{self.width}")
        self.latent_height = self.height // self.vae_scale_factor
        self.latent_width = self.width // self.vae_scale_factor

    def latent_shape(self) -> tuple[int, ...]:
        return (self.channels, self.latent_height, self.latent_width)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts → ``Conditioning``: ``embeds`` ``[B, L_clip + L_t5, joint_attention_dim]``,
        ``pooled`` ``[B, pooled_projection_dim]``, ``mask`` ``[B, L_clip + L_t5]`` bool."""
        prompts = list(prompts)
        device = self._sync_devices()
        hidden, pooled, clip_mask = [], [], None
        for tok, enc in zip(self.tokenizers, self.clip_encoders, strict=True):
            ids = tokenize(tok, prompts, self.clip_length)
            out = enc(input_ids=ids["input_ids"].to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
            mask = ids["attention_mask"].bool()
            clip_mask = mask if clip_mask is None else clip_mask | mask
        clip = torch.cat(hidden, dim=-1)
        joint = self.config.joint_attention_dim
        clip = torch.nn.functional.pad(clip, (0, joint - clip.shape[-1]))
        if self.text_encoder_3 is not None:
            ids = tokenize(self.tokenizer_3, prompts, self.max_sequence_length)
            t5 = self.text_encoder_3(input_ids=ids["input_ids"].to(device))[0]
            t5_mask = ids["attention_mask"].bool()
        else:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, joint, device=device, dtype=clip.dtype)
            t5_mask = torch.zeros(len(prompts), self.max_sequence_length, dtype=torch.bool)
        return Conditioning(embeds=torch.cat([clip, t5.to(clip.dtype)], dim=1).to(self.dtype),
                            pooled=torch.cat(pooled, dim=-1).to(self.dtype),
                            mask=torch.cat([clip_mask, t5_mask], dim=1).to(device))

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        return self._network()(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                           timestep=(t * 1000).to(self.dtype), return_dict=False)[0]


@hookimpl
def register_backbones(register):
    register("sd3", SD3Backbone)
