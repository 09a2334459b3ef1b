"""Z-Image (diffusers ``ZImageTransformer2DModel``, ``ZImagePipeline``) as a mixgrpo backbone.

Loaded from a local diffusers-format snapshot (Tongyi-MAI/Z-Image or Z-Image-Turbo)::

    transformer/     ZImageTransformer2DModel                        required
    text_encoder/    Qwen3Model (Qwen3-4B)                           required
    tokenizer/       the Qwen tokenizer with its chat template       required
    vae/             AutoencoderKL (scaling and shift factor)        required
    scheduler/, model_index.json                                     read by the pipeline, not here
    mixgrpo.json     {"height": ..., "width": ...} default size      optional

Everything follows ``ZImagePipeline`` (diffusers 0.42):

* **Prompts.** Each prompt is wrapped in the tokenizer's chat template as one user turn with the
  generation prompt (``enable_thinking=True``), tokenized to ``max_sequence_length`` (512), and
  encoded by Qwen3; the features are the penultimate hidden state at the prompt's real tokens.
  ``Conditioning.embeds`` keeps them padded to ``max_sequence_length`` with ``mask`` marking the real
  ones, and the transformer receives the variable-length list of real tokens, as the pipeline passes it.
* **Guidance.** The pipeline's own form ``v = v_c + g·(v_c − v_n)`` with ``g = guidance_scale``
  (on when ``g > 0``; ``g = 0`` for Turbo), against ``negative_prompt`` (default the empty prompt),
  optionally renormalized (``cfg_normalization``: ``‖v‖`` capped at that multiple of ``‖v_c‖``) and
  switched off where ``1 − σ > cfg_truncation``. It is ``v_n + s·(v_c − v_n)`` with
  ``s = g + 1``, which is what ``cfg_scale`` means on every other backbone.
* **Time.** The transformer takes ``1 − σ`` (it scales by ``t_scale`` = 1000 itself) and predicts
  ``x0 − ε``, so the velocity is its output negated. The σ grid is the trainer's: Z-Image's
  pipeline uses ``linspace(1, 1/T, T)`` shifted statically by the snapshot's scheduler (no dynamic
  shifting: Z-Image-Turbo's ``scheduler_config.json`` has shift 3.0), which is
  ``TrainConfig.grid = 'static'`` with ``TrainConfig.shift`` set to the snapshot's (``scheduler_shift``
  reads it; the backbone logs it when it loads).
* **Latents** stay unpacked ``[B, C, H/f, W/f]`` (f = the VAE's downsampling, 8); the transformer
  takes a list of one-frame images ``[C, 1, H/f, W/f]`` and patches them 2×2 itself.
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
from mixgrpo.plugins.backbones import sizes
from mixgrpo.plugins.backbones.diffusers_base import (
    DiffusersBackbone,
    component,
    read_defaults,
    resolve_dtype,
    tokenize,
)

# Flow-Factory's Z-Image LoRA targets (its ZImageAdapter.default_target_modules): attention and the
# SwiGLU feed-forward of every block (main layers and the noise / context refiners).
ZIMAGE_LORA_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                       "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
#: transformer classes of the diffusers backbones, by the plugin that loads them (for the error
#: that names the right plugin when a snapshot of another family is given)
FAMILY_OF = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
             "QwenImageTransformer2DModel": "qwenimage", "Flux2Transformer2DModel": "flux2",
             "ZImageTransformer2DModel": "zimage"}
log = logging.getLogger(__name__)

PATCH, FRAME_PATCH = 2, 1  # what ZImagePipeline passes to the transformer (its forward's defaults)
SEQ_MULTI_OF = 32  # the transformer pads each caption to a multiple of this (its module constant)


def scheduler_shift(root: str | Path) -> float | None:
    """The static shift of the snapshot's scheduler (``scheduler/scheduler_config.json``), or None
    when it has none or shifts dynamically."""
    file = Path(root) / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    return None if config.get("use_dynamic_shifting") else float(config.get("shift", 1.0))


def check_family(root: Path, expected: str, backbone: str) -> None:
    """A clear error, before any weights load, when ``root/transformer`` is another family's."""
    file = root / "transformer" / "config.json"
    found = json.loads(file.read_text()).get("_class_name") if file.is_file() else None
    if found and found != expected:
        plugin = FAMILY_OF.get(found)
        fix = f"use TrainConfig.backbone = '{plugin}'" if plugin else f"the {backbone!r} backbone needs a {expected}"
        raise ValueError(f"{root} holds a {found}, but the {backbone!r} backbone loads a {expected}: {fix}")


class ZImageBackbone(DiffusersBackbone):
    """Z-Image / Z-Image-Turbo from a local diffusers-format directory.

    Args: those of ``DiffusersBackbone`` (``path`` laid out as the module docstring says), except
        that guidance is set in the pipeline's own terms, and
        height, width: default ``mixgrpo.json`` in ``path``, else 1024 (the pipeline's default).
            Multiples of ``2 × VAE factor`` (16).
        guidance_scale: the pipeline's ``guidance_scale`` g: ``v = v_c + g·(v_c − v_n)``, on when
            g > 0 (two network evaluations per call). Default 5.0, ZImagePipeline's; Z-Image-Turbo
            samples with 0.
        negative_prompt: the prompt of the guidance's negative branch (default ``""``, the pipeline's).
        cfg_normalization: 0 (off, the pipeline's default) or c > 0: the guided velocity's norm is
            capped at c·‖v_c‖ per sample (the pipeline's ``cfg_normalization``; True means 1).
        cfg_truncation: guidance applies only where ``1 − σ ≤ cfg_truncation`` (default 1: always,
            the pipeline's). Both branches are still evaluated, so the NFE count stays 2 per call.
        cfg_gradient: ``"conditional"`` (default) trains through ``v_c`` only (``(1+g)·dv_c``).
        timestep_quantization: the network takes ``1 − σ`` (quantized: ``1 − floor(q·σ)/q``).
        max_sequence_length: chat-templated prompt tokens (512, the pipeline's default).
        lora_targets: default Flow-Factory's: attention and feed-forward projections of every block.
        vae_dtype: dtype of the VAE (default: ``dtype``).
    """

    family, model_name = "zimage", "Z-Image"
    transformer_class, diffusers_pipeline = "ZImageTransformer2DModel", "ZImagePipeline"
    default_lora_targets = ZIMAGE_LORA_TARGETS

    def __init__(self, path: str, height: int | None = None, width: int | None = None,
                 dtype: str = "float32", guidance_scale: float = 5.0, negative_prompt: str = "",
                 cfg_normalization: float = 0.0, cfg_truncation: float = 1.0, cfg_gradient: str = "conditional",
                 timestep_quantization: int | None = None, max_sequence_length: int = 512,
                 lora_rank: int = 0, lora_alpha: float | None = None, lora_targets: Sequence[str] | None = None,
                 gradient_checkpointing: bool = False, vae_dtype: str | None = None,
                 attention_backend: str | None = None, compile: str = "none",  # noqa: A002 (gin name)
                 device: str | None = None) -> None:
        if guidance_scale < 0 or cfg_normalization < 0:
            raise ValueError(f"guidance_scale and cfg_normalization must be >= 0 (0 = off), got {guidance_scale} "
                             f"and {cfg_normalization}")
        if int(max_sequence_length) < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.negative_prompt = str(negative_prompt)
        self.cfg_normalization, self.cfg_truncation = float(cfg_normalization), float(cfg_truncation)
        self.max_sequence_length = int(max_sequence_length)
        self.vae_dtype = vae_dtype
        root = Path(str(path)).expanduser()
        if (root / "transformer").is_dir():  # else the shared constructor says what is missing
            check_family(root, self.transformer_class, self.family)
        super().__init__(path, height, width, dtype=dtype, cfg_scale=float(guidance_scale) + 1.0,
                         cfg_gradient=cfg_gradient, timestep_quantization=timestep_quantization,
                         lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                         gradient_checkpointing=gradient_checkpointing, attention_backend=attention_backend,
                         compile=compile, device=device)

    # -- set-up --------------------------------------------------------------------------------
    def _load_components(self, root: Path, load: dict) -> None:
        from diffusers import AutoencoderKL
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(component(root, "tokenizer", "Qwen tokenizer"),
                                                       local_files_only=True)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{root}/tokenizer has no chat template; ZImagePipeline wraps every prompt in it "
                             "(copy the snapshot's tokenizer/ folder whole, with its chat template)")
        self.text_encoder = AutoModel.from_pretrained(component(root, "text_encoder", "Qwen3 text encoder"), **load)
        self.vae = AutoencoderKL.from_pretrained(component(root, "vae", "VAE"), local_files_only=True,
                                                 dtype=resolve_dtype(self.vae_dtype or self.dtype))
        self.frozen = {"text_encoder": self.text_encoder, "vae": self.vae}
        width = self.text_encoder.config.hidden_size
        if width != self.config.cap_feat_dim:
            raise ValueError(f"{root}: the transformer's cap_feat_dim is {self.config.cap_feat_dim} but the text "
                             f"encoder's hidden states have {width} features")

    @classmethod
    def pixel_multiple(cls, path: str | Path) -> int | None:
        """The multiple of pixels ``height`` and ``width`` must be, the VAE's downsampling times the
        patch ZImagePipeline runs (``PATCH``), read from the config files of the model folder ``path``
        before anything loads (``sizes``); None when they do not say, and ``_set_latent_layout`` checks
        after loading."""
        root = sizes.model_folder(path)
        cfg = sizes.transformer_config(root, cls.transformer_class) if root else None
        if cfg is None or PATCH not in cfg.get("all_patch_size", ()):
            return None
        scale = sizes.vae_downsampling(root)
        return scale * PATCH if scale else None

    def _set_latent_layout(self, root: Path, height: int | None, width: int | None) -> None:
        cfg, vae_cfg = self.config, self.vae.config
        if PATCH not in cfg.all_patch_size or FRAME_PATCH not in cfg.all_f_patch_size:
            raise ValueError(f"{root}: the transformer has patch sizes {cfg.all_patch_size}/{cfg.all_f_patch_size}; "
                             f"ZImagePipeline runs it with {PATCH}/{FRAME_PATCH}")
        if vae_cfg.latent_channels != cfg.in_channels:
            raise ValueError(f"{root}: transformer in_channels {cfg.in_channels} do not match the VAE's "
                             f"{vae_cfg.latent_channels} latent channels")
        self.channels = cfg.in_channels
        self.vae_scale_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        defaults = read_defaults(root)
        self.height = int(height or defaults.get("height", 1024))
        self.width = int(width or defaults.get("width", 1024))
        step = self.vae_scale_factor * PATCH
        if self.height % step or self.width % step:
            raise ValueError(f"height and width must be multiples of {step}, got {self.height}×{self.width}")
        self.latent_height = self.height // self.vae_scale_factor
        self.latent_width = self.width // self.vae_scale_factor
        self._check_positions(root)
        shift = scheduler_shift(root)
        if shift is not None:  # the grid is the trainer's (TrainConfig.shift), so say what the pipeline uses
            log.info("%s: ZImagePipeline samples on a static shift of %g (scheduler_config.json); "
                     "TrainConfig.shift should match", root, shift)

    def _check_positions(self, root: Path) -> None:
        """The RoPE tables cover the positions the pipeline uses: caption tokens at 1…L (L padded to
        a multiple of 32), the image one past them on the first axis and at its patch grid on the others."""
        lengths = self.config.axes_lens
        caption = self.max_sequence_length + (-self.max_sequence_length) % SEQ_MULTI_OF
        rows, cols = self.latent_height // PATCH, self.latent_width // PATCH
        if caption + 2 > lengths[0]:
            raise ValueError(f"{root}: max_sequence_length {self.max_sequence_length} exceeds the transformer's "
                             f"caption positions (axes_lens[0] = {lengths[0]}); use at most {lengths[0] - 2 - 31}")
        if rows > lengths[1] or cols > lengths[2]:
            raise ValueError(f"{self.height}×{self.width} gives a {rows}×{cols} patch grid, beyond the transformer's "
                             f"positions {lengths[1]}×{lengths[2]}: lower height/width")

    # -- the Backbone interface ----------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        return (self.channels, self.latent_height, self.latent_width)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts → ``Conditioning``: ``embeds`` ``[B, max_sequence_length, cap_feat_dim]`` (Qwen3's
        penultimate hidden state, zero at padding), ``mask`` ``[B, max_sequence_length]`` bool
        (the real tokens the transformer receives), no pooled features."""
        device = self._sync_devices()
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        ids = tokenize(self.tokenizer, texts, self.max_sequence_length)
        mask = ids["attention_mask"].to(device).bool()
        hidden = self.text_encoder(input_ids=ids["input_ids"].to(device), attention_mask=mask,
                                   output_hidden_states=True).hidden_states[-2]
        return Conditioning(embeds=(hidden * mask[..., None]).to(self.dtype), mask=mask)

    @staticmethod
    def captions(cond: Conditioning) -> list[torch.Tensor]:
        """The variable-length list the transformer takes: each prompt's real tokens ``[L_i, D]``."""
        if cond.mask is None:
            raise ValueError("Z-Image conditioning needs its token mask (encode it with ZImageBackbone.encode)")
        return [e[m] for e, m in zip(cond.embeds, cond.mask.to(cond.embeds.device), strict=True)]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``v ≈ ε − x0`` ``[B, C, h, w]`` fp32 (the negated transformer output); with guidance one doubled
        batch (2 NFE), combined by ``combine_guidance`` in the pipeline's form (see the module docstring).
        ``cfg_gradient="conditional"`` detaches the negative branch."""
        batch, device = x.shape[0], self.device
        sigma = self._timestep(sigma.to(device), batch)
        t = (1000 - sigma * 1000) / 1000  # 1 − σ, rounded as the pipeline computes it from σ·1000
        x = x.to(device=device, dtype=self.dtype)
        captions = [c.to(device, self.dtype) for c in self.captions(cond)]
        guided = self.cfg_scale > 1.0
        if guided:
            captions += [c.to(device, self.dtype) for c in self.captions(self.negative())] * batch
            x, t = torch.cat([x, x]), torch.cat([t, t])
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self._call_transformer(x, t, captions)
        v = -out  # the transformer predicts x0 − ε
        if not guided:
            return v
        v_cond, v_uncond = v.chunk(2)  # the conditional branch first, as the pipeline batches them
        if self.cfg_gradient == "conditional":
            v_uncond = v_uncond.detach()
        return self.combine_guidance(v_uncond, v_cond, sigma)

    def combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """ZImagePipeline's guidance ``[B, C, h, w]`` fp32: ``v_c + g·(v_c − v_u)``, the norm capped at
        ``cfg_normalization·‖v_c‖`` per sample, and ``v_c`` alone where ``1 − σ > cfg_truncation`` (the
        pipeline applies it to the transformer's outputs, the negated velocities: the same numbers negated)."""
        g = self.cfg_scale - 1.0
        guided = v_cond + g * (v_cond - v_uncond)
        if self.cfg_normalization > 0:
            limit = torch.linalg.vector_norm(v_cond.flatten(1), dim=1) * self.cfg_normalization
            norm = torch.linalg.vector_norm(guided.flatten(1), dim=1)
            scale = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
            guided = guided * scale.view(-1, *([1] * (guided.ndim - 1)))
        if self.cfg_truncation <= 1:
            keep = ((1 - sigma.float()) > self.cfg_truncation).view(-1, *([1] * (guided.ndim - 1)))
            guided = torch.where(keep, v_cond, guided)
        return guided

    def _call_transformer(self, x: torch.Tensor, t: torch.Tensor, captions: list[torch.Tensor]) -> torch.Tensor:
        """One transformer call (in place of ``DiffusersBackbone._forward``, which takes padded text):
        latents ``[N, C, h, w]`` as a list of one-frame images, ``t`` = 1 − σ, the captions' token
        lists; returns the stacked outputs ``[N, C, h, w]`` fp32 (not negated)."""
        images = list(x.unsqueeze(2).unbind(0))
        # t stays fp32, as the pipeline passes it: the timestep embedding is computed in fp32 from
        # t·1000, and a bf16 t would move it by up to 2 timesteps
        out = self._network()(images, t.float(), captions, patch_size=PATCH, f_patch_size=FRAME_PATCH,
                              return_dict=False)[0]
        return torch.stack([o.float() for o in out]).squeeze(2)

    # -- publishing ----------------------------------------------------------------------------
    def model_facts(self) -> ModelFacts:
        """ZImagePipeline's ``guidance_scale`` is g = cfg_scale − 1 (its form ``v_c + g·(v_c − v_n)``)."""
        g = self.cfg_scale - 1.0
        return attrs.evolve(super().model_facts(), guidance=g,
                            guidance_settings={"guidance_scale": g, "cfg_normalization": self.cfg_normalization,
                                               "cfg_truncation": self.cfg_truncation})

    def set_guidance(self, scale: float) -> str:
        """The pipeline's ``guidance_scale`` (g ≥ 0; 0 turns guidance off)."""
        if scale < 0:
            raise ValueError(f"Z-Image's guidance_scale must be >= 0 (0 = off), got {scale}")
        self.cfg_scale = float(scale) + 1.0
        return "guidance_scale"


@hookimpl
def register_backbones(register):
    register("zimage", ZImageBackbone)
