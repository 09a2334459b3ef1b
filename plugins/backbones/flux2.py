"""FLUX.2-klein (diffusers ``Flux2Transformer2DModel``, ``Flux2KleinPipeline``) as a mixgrpo backbone,
loaded from a local diffusers snapshot::

    model_index.json  Flux2KleinPipeline (``is_distilled``: true for the 4-step klein-4B/9B)  optional
    transformer/      Flux2Transformer2DModel (no guidance embedding)                       required
    text_encoder/     Qwen3ForCausalLM                                                      required
    tokenizer/        Qwen2Tokenizer with a chat template                                   required
    vae/              AutoencoderKLFlux2 (batch-norm latent statistics)                     required
    mixgrpo.json      {"height": ..., "width": ...} default image size                      optional

Everything follows ``Flux2KleinPipeline`` (diffusers 0.42):

* **Text.** Each prompt goes through the tokenizer's chat template as one user turn with the
  generation prompt and thinking disabled, is padded to ``max_sequence_length`` tokens (512), and the
  Qwen3 hidden states of layers 9, 18 and 27 are laid side by side per token (``[B, L, 3·hidden]``).
  The transformer attends to every token, padding included, with text position ids ``(0, 0, 0, l)``.
  FLUX.2 has no pooled text features.
* **Guidance.** The base models (klein-base-4B/9B) use classifier-free guidance against the empty
  prompt, ``v_u + s·(v_c − v_u)``, s = 4 by default; the step-distilled ones take no guidance.
* **Latents.** The VAE's latents are cut into 2×2 patches (channel-major, ``4·C`` channels at half
  the resolution) and normalised by the VAE's batch-norm running statistics; this patchified,
  normalised tensor ``[B, 4C, H/2f, W/2f]`` is the backbone's latent (f = the VAE's downsampling),
  the layout the pipeline's ``latents`` argument takes (the hooks ``to_vae_latents`` and
  ``from_vae_latents``). The transformer sees it flattened row-major into ``[B, (H/2f)(W/2f), 4C]``
  with image position ids ``(0, row, col, 0)`` and is fed σ itself.
* **σ grid.** The pipeline walks ``linspace(1, 1/T, T)`` shifted exponentially by an empirical
  ``mu`` that depends on the image token count and on T (``empirical_mu``): the core's dynamic grid
  (``TrainConfig.grid = 'dynamic'``, ``TrainConfig.mu = backbone.pipeline_mu(T)``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.types import Conditioning
from mixgrpo.plugins.backbones import resolve_model_path, sizes
from mixgrpo.plugins.backbones.diffusers_base import (
    DiffusersBackbone,
    check_model_class,
    component,
    read_defaults,
    resolve_dtype,
    tokenize,
)

# The attention projections of both block kinds and the feed-forwards of the double-stream blocks,
# named as diffusers names FLUX.2's modules (Flow-Factory's default FLUX.2-klein targets). The
# single-stream blocks' fused output projection is left out: its name, ``attn.to_out``, also ends
# the double-stream blocks' ``attn.to_out`` list, which LoRA cannot wrap.
FLUX2_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                      "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                      "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                      "attn.to_qkv_mlp_proj")
#: the Qwen3 layers whose hidden states the pipeline stacks (``text_encoder_out_layers``)
TEXT_LAYERS = (9, 18, 27)
#: the pipeline's ``guidance_scale`` default (the base models' model cards recommend 4)
DEFAULT_CFG = 4.0
#: the pipeline's default size (``default_sample_size`` 128 latents × the VAE's 8)
DEFAULT_SIZE = 1024


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's time-shift parameter ``mu`` for ``image_seq_len`` image tokens and ``num_steps`` steps.

    BFL fitted mu as a line in the token count n at 10 steps (``8.738e-5·n + 1.898``) and at 200
    steps (``1.6927e-4·n + 0.4567``) and interpolates linearly in the step count between them (and
    beyond); above 4300 tokens the 200-step line alone is used. ``Flux2KleinPipeline`` computes it
    the same way (``compute_empirical_mu``).
    """
    at_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    return float(at_10 + (at_200 - at_10) * (num_steps - 10) / 190.0)


def latent_ids(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """Image position ids ``[rows·cols, 4]``: ``(0, row, col, 0)`` in row-major order."""
    ids = torch.zeros(rows, cols, 4, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 4)


def text_ids(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Text position ids ``[length, 4]``: ``(0, 0, 0, l)``."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def patchify(z: torch.Tensor) -> torch.Tensor:
    """VAE latents ``[B, C, h, w]`` → ``[B, 4C, h/2, w/2]``: 2×2 patches, channel-major (c, dy, dx)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``patchify``: ``[B, 4C, h/2, w/2]`` → ``[B, C, h, w]``."""
    b, c4, h, w = x.shape
    return x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


def read_pipeline_index(root: Path) -> dict[str, Any]:
    """``model_index.json`` of a snapshot (empty when the folder has none), checked to be FLUX.2-klein's."""
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    name = index.get("_class_name")
    if name == "Flux2Pipeline":
        raise ValueError(f"{root} is a FLUX.2-dev snapshot (Flux2Pipeline, a Mistral-3 text encoder and guidance "
                         "embedding); the 'flux2' backbone loads FLUX.2-klein snapshots (Flux2KleinPipeline, Qwen3)")
    if name and not name.startswith("Flux2Klein"):
        raise ValueError(f"{root} holds a {name} snapshot; the 'flux2' backbone loads Flux2KleinPipeline snapshots")
    return index


class Flux2Backbone(DiffusersBackbone):
    """FLUX.2-klein (4B/9B, base or step-distilled) from a local diffusers snapshot.

    Args: those of ``DiffusersBackbone`` (``path`` laid out as the module docstring says), and
        height, width: default ``mixgrpo.json`` in ``path``, else 1024 (the pipeline's). Multiples of
            2× the VAE's downsampling (16).
        cfg_scale: classifier-free guidance; default None = the pipeline's: 4 for a base model, 1 (none)
            for a step-distilled one (``model_index.json`` ``is_distilled``), whose pipeline ignores
            guidance; a scale > 1 there is refused.
        max_sequence_length: text tokens per prompt, chat template included (512, the pipeline's).
        text_encoder_out_layers: the Qwen3 layers whose hidden states are stacked (9, 18, 27).
        lora_targets: default ``FLUX2_LORA_TARGETS``.
        vae_dtype: dtype of the VAE (default: ``dtype``); ``"float32"`` decodes free of bf16 error.
    """

    family, model_name = "flux2", "FLUX.2-klein"
    transformer_class, diffusers_pipeline = "Flux2Transformer2DModel", "Flux2KleinPipeline"
    default_lora_targets = FLUX2_LORA_TARGETS

    def __init__(self, path: str, height: int | None = None, width: int | None = None,
                 dtype: str = "float32", cfg_scale: float | None = None, cfg_gradient: str = "conditional",
                 timestep_quantization: int | None = None, max_sequence_length: int = 512,
                 text_encoder_out_layers: Sequence[int] = TEXT_LAYERS,
                 lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] | None = None, gradient_checkpointing: bool = False,
                 vae_dtype: str | None = None, attention_backend: str | None = None,
                 compile: str = "none", device: str | None = None) -> None:  # noqa: A002 (gin name)
        self.max_sequence_length = int(max_sequence_length)
        self.text_layers = tuple(int(k) for k in text_encoder_out_layers)
        self.vae_dtype = vae_dtype
        if self.max_sequence_length < 1 or not self.text_layers:
            raise ValueError("max_sequence_length must be >= 1 and text_encoder_out_layers name at least one layer")
        root = resolve_model_path(path, self.model_name)
        # another family's snapshot names its backbone before its model_index.json is read
        check_model_class(component(root, "transformer", f"{self.model_name} transformer"),
                          self.transformer_class, self.family)
        self.distilled = bool(read_pipeline_index(root).get("is_distilled", False))
        super().__init__(path, height, width, dtype=dtype, cfg_scale=self._default_cfg(cfg_scale),
                         cfg_gradient=cfg_gradient, timestep_quantization=timestep_quantization, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, lora_targets=lora_targets,
                         gradient_checkpointing=gradient_checkpointing, attention_backend=attention_backend,
                         compile=compile, device=device)

    def _default_cfg(self, cfg_scale: float | None) -> float:
        """The pipeline's guidance for this snapshot; guidance on a step-distilled model is refused
        (its pipeline would silently ignore it, so the rollout would not be the pipeline's)."""
        if cfg_scale is None:
            return 1.0 if self.distilled else DEFAULT_CFG
        if self.distilled and cfg_scale > 1.0:
            raise ValueError(f"cfg_scale={cfg_scale} on a step-distilled FLUX.2-klein (model_index.json "
                             "is_distilled = true), whose pipeline takes no guidance: set cfg_scale = 1, or train "
                             "the base model (FLUX.2-klein-base-4B/9B) with guidance")
        return float(cfg_scale)

    def _load_components(self, root: Path, load: dict) -> None:
        from diffusers import AutoencoderKLFlux2
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        self.tokenizer = AutoTokenizer.from_pretrained(component(root, "tokenizer", "Qwen tokenizer"),
                                                       local_files_only=True)
        self.text_encoder = Qwen3ForCausalLM.from_pretrained(component(root, "text_encoder", "Qwen3 text encoder"),
                                                             **load)
        self.vae = AutoencoderKLFlux2.from_pretrained(component(root, "vae", "VAE"), local_files_only=True,
                                                      dtype=resolve_dtype(self.vae_dtype or self.dtype))
        self.frozen = {"text_encoder": self.text_encoder, "vae": self.vae}
        self._check_text(root)

    def _check_text(self, root: Path) -> None:
        cfg, text = self.config, self.text_encoder.config
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{root}/tokenizer has no chat template; FLUX.2-klein encodes prompts through Qwen3's "
                             "(copy the snapshot's tokenizer/ folder whole, chat_template.jinja included)")
        if max(self.text_layers) > text.num_hidden_layers or min(self.text_layers) < 0:
            raise ValueError(f"text_encoder_out_layers={self.text_layers}, but the Qwen3 text encoder has "
                             f"{text.num_hidden_layers} layers (hidden states 0..{text.num_hidden_layers})")
        width = len(self.text_layers) * text.hidden_size
        if width != cfg.joint_attention_dim:
            raise ValueError(f"{root}: the transformer's joint_attention_dim is {cfg.joint_attention_dim} but "
                             f"{len(self.text_layers)} Qwen3 layers of width {text.hidden_size} give {width}")
        if cfg.guidance_embeds:
            raise ValueError(f"{root}: the transformer embeds a guidance value (guidance_embeds = true, FLUX.2-dev's); "
                             "Flux2KleinPipeline passes none, so this is not a FLUX.2-klein transformer")

    @classmethod
    def pixel_multiple(cls, path: str | Path) -> int | None:
        """The multiple of pixels ``height`` and ``width`` must be, 2× the VAE's downsampling (then 2×2
        patches), read from the config files of the model folder ``path`` before anything loads
        (``sizes``); None when they do not say, and ``_set_latent_layout`` checks after loading."""
        root = sizes.model_folder(path)
        cfg = sizes.transformer_config(root, cls.transformer_class) if root else None
        if cfg is None or cfg.get("patch_size", 1) != 1:
            return None
        scale = sizes.vae_downsampling(root)
        return 2 * scale if scale else None

    def _set_latent_layout(self, root: Path, height: int | None, width: int | None) -> None:
        cfg, vae_cfg = self.config, self.vae.config
        if cfg.patch_size != 1:
            raise ValueError(f"{root}: transformer patch_size={cfg.patch_size}; FLUX.2 packs 2×2 patches outside the "
                             "transformer and expects patch_size=1")
        if cfg.in_channels != 4 * vae_cfg.latent_channels or (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
            raise ValueError(f"{root}: transformer in/out channels {cfg.in_channels}/{cfg.out_channels} do not match "
                             f"the VAE's {vae_cfg.latent_channels} latent channels in 2×2 patches "
                             f"({4 * vae_cfg.latent_channels})")
        self.channels = cfg.in_channels
        self.vae_scale_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        defaults = read_defaults(root)
        self.height = int(height or defaults.get("height", DEFAULT_SIZE))
        self.width = int(width or defaults.get("width", DEFAULT_SIZE))
        step = 2 * self.vae_scale_factor
        if self.height % step or self.width % step:
            raise ValueError(f"height and width must be multiples of {step} (the VAE's {self.vae_scale_factor}× "
                             f"downsampling, then 2×2 patches), got {self.height}×{self.width}")
        self.latent_height, self.latent_width = self.height // step, self.width // step

    # -- the Backbone interface ----------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        return (self.channels, self.latent_height, self.latent_width)

    def pipeline_mu(self, num_steps: int) -> float:
        """The ``mu`` of the pipeline's σ grid at this size for ``num_steps`` steps (``TrainConfig.mu``)."""
        return empirical_mu(self.latent_height * self.latent_width, num_steps)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts → ``Conditioning``: ``embeds`` ``[B, L, len(layers)·hidden]`` (the stacked Qwen3 hidden
        states), ``pooled`` an empty ``[B, 0]`` (FLUX.2 has none; an empty tensor lets the shared CFG
        batching stack it), ``mask`` ``[B, L]`` bool (the tokenizer's; the transformer attends to all)."""
        device = self._sync_devices()
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
                 for p in prompts]
        ids = tokenize(self.tokenizer, texts, self.max_sequence_length)
        mask = ids["attention_mask"].to(device)
        out = self.text_encoder(input_ids=ids["input_ids"].to(device), attention_mask=mask,
                                output_hidden_states=True, use_cache=False)
        embeds = torch.cat([out.hidden_states[k] for k in self.text_layers], dim=-1)  # per token: layers side by side
        return Conditioning(embeds=embeds.to(self.dtype), pooled=embeds.new_zeros(len(texts), 0, dtype=self.dtype),
                            mask=mask.bool())

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = self._network()(
            hidden_states=x.reshape(b, c, h * w).transpose(1, 2),  # row-major tokens of 4C channels
            encoder_hidden_states=embeds,
            timestep=t.to(self.dtype),
            img_ids=latent_ids(h, w, x.device),
            txt_ids=text_ids(embeds.shape[1], x.device),
            guidance=None,
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, h, w)

    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm mean and std ``[1, 4C, 1, 1]`` over the patchified latents."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return mean, std

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """De-normalise by the batch-norm statistics, then unpatchify (``[B, 4C, h/2, w/2]`` → ``[B, C, h, w]``)."""
        mean, std = self._latent_stats()
        return unpatchify(latents * std.to(latents.dtype) + mean.to(latents.dtype))

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Patchify and normalise in fp32, as the pipeline encodes reference images."""
        mean, std = self._latent_stats()
        return (patchify(z).float() - mean.float()) / std.float()

    # -- publishing ----------------------------------------------------------------------------
    def set_guidance(self, scale: float) -> str:
        """Classifier-free guidance; a step-distilled model takes none (``ValueError``)."""
        self._default_cfg(scale)
        return super().set_guidance(scale)


@hookimpl
def register_backbones(register):
    register("flux2", Flux2Backbone)
