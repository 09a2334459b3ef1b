"""FLUX (diffusers ``FluxTransformer2DModel``) as a mixgrpo backbone, loaded from a local directory.

The same class loads FLUX.1-dev (transformer + CLIP + T5 + VAE) and the project's tiny shapes-world
model (transformer + one small CLIP-style text encoder, no VAE: it works directly on pixels).
``mixgrpo.plugins.backbones.tiny.build_tiny_flux`` writes such a tiny model with random weights of the
real classes; the machinery FLUX shares with SD3 is in ``diffusers_base.py``.

Layout of the directory (diffusers format)::

    transformer/      FluxTransformer2DModel                          required
    text_encoder/     CLIPTextModel (pooled features)                  required
    tokenizer/        any tokenizer AutoTokenizer loads                required
    text_encoder_2/   T5EncoderModel (per-token features)              optional
    tokenizer_2/                                                       with text_encoder_2
    vae/              AutoencoderKL                                    optional (else pixel space)
    mixgrpo.json      {"height": ..., "width": ...} default image size optional

Latents are kept unpacked, ``[B, C, h, w]``; the transformer sees them packed into ``p×p`` patches
(``[B, (h/p)(w/p), C·p²]``, channel-major within a patch, as ``FluxPipeline._pack_latents``) with
image position ids ``(0, row, col)`` and all-zero text ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import ModelFacts
from mixgrpo.core.sigmas import flux_mu
from mixgrpo.core.types import Conditioning
from mixgrpo.plugins.backbones import sizes
from mixgrpo.plugins.backbones.diffusers_base import DiffusersBackbone, component, read_defaults, tokenize


def pack(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, (h/p)(w/p), C·p²]`` (row-major patches, channel-major inside)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, channels: int, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of ``pack``: ``[B, (h/p)(w/p), C·p²]`` → ``[B, C, h, w]``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height // patch, width // patch, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, height, width)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """FLUX position ids ``[rows·cols, 3]`` fp32: ``(0, row, col)`` in row-major order."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


# -- FLUX ------------------------------------------------------------------------------------------
class FluxBackbone(DiffusersBackbone):
    """FLUX.1 (or the tiny shapes-world FLUX) from a local diffusers-format directory.

    Args: those of ``DiffusersBackbone`` (``path`` laid out as the module docstring says), and
        height, width: default ``mixgrpo.json`` in ``path``, else 32 in pixel space and 1024 with a
            VAE. Multiples of the patch size in pixel space (of 2× the VAE's downsampling factor
            with a VAE).
        guidance: the embedded guidance value passed to guidance-distilled transformers
            (``transformer.config.guidance_embeds``, FLUX.1-dev); ignored otherwise.
        cfg_scale: default 1 (no classifier-free guidance: FLUX.1-dev is guidance-distilled).
        max_sequence_length: T5 tokens per prompt (77; FLUX.1-dev is usually run with 512).
            Without T5 the CLIP sequence is used, capped by the CLIP context length.
        lora_targets: default ``to_q, to_k, to_v, to_out.0``.
    """

    family, model_name = "flux", "FLUX"
    transformer_class, diffusers_pipeline = "FluxTransformer2DModel", "FluxPipeline"

    def __init__(self, path: str, height: int | None = None, width: int | None = None,
                 dtype: str = "float32", guidance: float = 3.5, cfg_scale: float = 1.0,
                 cfg_gradient: str = "conditional", timestep_quantization: int | None = None,
                 max_sequence_length: int = 77,
                 lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] | None = None, gradient_checkpointing: bool = False,
                 attention_backend: str | None = None, compile: str = "none",  # noqa: A002 (gin name)
                 device: str | None = None) -> None:
        self.guidance = float(guidance)
        self.max_sequence_length = int(max_sequence_length)
        super().__init__(path, height, width, dtype=dtype, cfg_scale=cfg_scale, cfg_gradient=cfg_gradient,
                         timestep_quantization=timestep_quantization, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                         attention_backend=attention_backend, compile=compile, device=device)

    def _load_components(self, root: Path, load: dict) -> None:
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(component(root, "tokenizer", "CLIP tokenizer"),
                                                       local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(component(root, "text_encoder", "CLIP text encoder"),
                                                          **load)
        self.frozen = {"text_encoder": self.text_encoder}
        self.tokenizer_2 = self.text_encoder_2 = None
        if component(root, "text_encoder_2", "T5", required=False):
            self.tokenizer_2 = AutoTokenizer.from_pretrained(component(root, "tokenizer_2", "T5 tokenizer"),
                                                             local_files_only=True)
            self.text_encoder_2 = T5EncoderModel.from_pretrained(root / "text_encoder_2", **load)
            self.frozen["text_encoder_2"] = self.text_encoder_2
        if component(root, "vae", "VAE", required=False):
            self.vae = AutoencoderKL.from_pretrained(root / "vae", **load)
            self.frozen["vae"] = self.vae
        self._check_text_dims(root)
        self._set_sequence_lengths()

    # -- set-up --------------------------------------------------------------------------------
    def _check_text_dims(self, root: Path) -> None:
        cfg = self.config
        clip_dim = self.text_encoder.config.hidden_size
        if self.text_encoder_2 is not None:
            seq_dim, seq_from = self.text_encoder_2.config.d_model, "text_encoder_2 (T5) d_model"
        else:
            seq_dim, seq_from = clip_dim, "text_encoder hidden_size (no text_encoder_2/, so the CLIP sequence is used)"
        if seq_dim != cfg.joint_attention_dim:
            raise ValueError(f"{root}: the transformer's joint_attention_dim is {cfg.joint_attention_dim} but the "
                             f"text sequence features have {seq_dim} ({seq_from})")
        if clip_dim != cfg.pooled_projection_dim:
            raise ValueError(f"{root}: the transformer's pooled_projection_dim is {cfg.pooled_projection_dim} but "
                             f"the CLIP text encoder's pooled features have {clip_dim}")

    def _set_sequence_lengths(self) -> None:
        limit = self.text_encoder.config.max_position_embeddings
        tok_max = self.tokenizer.model_max_length
        self.clip_length = min(limit, tok_max) if tok_max and tok_max < 10**6 else limit
        if self.text_encoder_2 is None:
            self.clip_length = min(self.clip_length, self.max_sequence_length)

    @classmethod
    def pixel_multiple(cls, path: str | Path) -> int | None:
        """The multiple of pixels ``height`` and ``width`` must be, 2× the VAE's downsampling (the patch
        in pixel space, without ``vae/``), read from the config files of the model folder ``path``
        before anything loads (``sizes``); None when they do not say, and ``_set_latent_layout`` checks
        after loading."""
        root = sizes.model_folder(path)
        cfg = sizes.transformer_config(root, cls.transformer_class) if root else None
        if cfg is None or cfg.get("patch_size", 1) != 1:
            return None
        if (root / "vae").is_dir():
            scale = sizes.vae_downsampling(root)
            return 2 * scale if scale else None
        channels = sizes.positive_int(cfg.get("in_channels")) or 0
        patch = math.isqrt(channels // 3)
        return patch if patch and 3 * patch**2 == channels else None

    def _set_latent_layout(self, root: Path, height: int | None, width: int | None) -> None:
        cfg = self.config
        if cfg.patch_size != 1:
            raise ValueError(f"{root}: transformer patch_size={cfg.patch_size}; FLUX packs patches outside the "
                             "transformer and expects patch_size=1")
        if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
            raise ValueError(f"{root}: out_channels={cfg.out_channels} differs from in_channels={cfg.in_channels}")
        defaults = read_defaults(root)
        if self.vae is None:  # pixel space: RGB in [−1, 1], packed by p×p patches
            self.channels, scale = 3, 1
            self.patch = math.isqrt(cfg.in_channels // 3)
            if 3 * self.patch**2 != cfg.in_channels:
                raise ValueError(f"{root}: no vae/ folder, so the model works on RGB pixels and needs "
                                 f"in_channels = 3·p², got {cfg.in_channels}")
            fallback = 32
        else:
            self.channels, self.patch = self.vae.config.latent_channels, 2
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            if cfg.in_channels != 4 * self.channels:
                raise ValueError(f"{root}: transformer in_channels={cfg.in_channels} but the VAE has "
                                 f"{self.channels} latent channels packed 2×2 (expected {4 * self.channels})")
            fallback = 1024
        self.vae_scale_factor = scale
        self.height = int(height or defaults.get("height", fallback))
        self.width = int(width or defaults.get("width", fallback))
        step = scale * self.patch
        if self.height % step or self.width % step:
            raise ValueError(f"height and width must be multiples of {step}, got {self.height}×{self.width}")
        self.latent_height, self.latent_width = self.height // scale, self.width // scale

    # -- the Backbone interface ----------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        return (self.channels, self.latent_height, self.latent_width)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts → ``Conditioning``: ``embeds`` ``[B, L, joint_attention_dim]`` (T5, or the CLIP sequence),
        ``pooled`` ``[B, pooled_projection_dim]`` (CLIP at the EOS token), ``mask`` ``[B, L]`` bool."""
        return self.encode_with_grad(prompts)

    def encode_with_grad(self, prompts: Sequence[str]) -> Conditioning:
        """``encode`` without ``no_grad``: for pretraining the text encoder with the transformer."""
        prompts = list(prompts)
        device = self._sync_devices()
        clip = tokenize(self.tokenizer, prompts, self.clip_length)
        out = self.text_encoder(input_ids=clip["input_ids"].to(device))
        pooled, embeds, mask = out.pooler_output, out.last_hidden_state, clip["attention_mask"]
        if self.text_encoder_2 is not None:
            t5 = tokenize(self.tokenizer_2, prompts, self.max_sequence_length)
            embeds = self.text_encoder_2(input_ids=t5["input_ids"].to(device))[0]
            mask = t5["attention_mask"]
        return Conditioning(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype),
                            mask=mask.to(device=device, dtype=torch.bool))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return pack(x, self.patch)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpack(tokens, self.channels, self.latent_height, self.latent_width, self.patch)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        device, batch = x.device, x.shape[0]
        guidance = None
        if self.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=device, dtype=torch.float32)
        out = self._network()(
            hidden_states=self.pack(x),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=t.to(self.dtype),
            img_ids=image_ids(self.latent_height // self.patch, self.latent_width // self.patch).to(device),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return self.unpack(out)

    def pipeline_mu(self, num_steps: int | None = None) -> float:
        """``mu`` of the pipeline's dynamic σ grid at this size (FluxPipeline's and FluxKontextPipeline's):
        ``flux_mu`` of the generated image's token count, whatever ``num_steps`` (``TrainConfig.grid =
        'dynamic'``, ``TrainConfig.mu``)."""
        return flux_mu((self.latent_height // self.patch) * (self.latent_width // self.patch))

    # -- publishing ----------------------------------------------------------------------------
    def model_facts(self) -> ModelFacts:
        """FluxPipeline's ``guidance_scale`` is the embedded guidance (its CFG is ``true_cfg_scale``)."""
        return attrs.evolve(super().model_facts(), guidance=self.guidance,
                            guidance_settings={"cfg_scale": self.cfg_scale, "guidance": self.guidance})

    def set_guidance(self, scale: float) -> str:
        """The embedded guidance of a guidance-distilled FLUX (FLUX.1-dev), else classifier-free guidance."""
        if self.config.guidance_embeds:
            self.guidance = float(scale)
            return "guidance"
        return super().set_guidance(scale)


@hookimpl
def register_backbones(register):
    register("flux", FluxBackbone)
