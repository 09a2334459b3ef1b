"""FLUX (diffusers ``FluxTransformer2DModel``) as a mixgrpo backbone, loaded from a local directory.

The same class loads FLUX.1-dev (transformer + CLIP + T5 + VAE) and the project's tiny shapes-world
model (transformer + one small CLIP-style text encoder, no VAE: it works directly on pixels).
``build_tiny_flux`` writes such a tiny model with random weights of the real classes.

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

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import TorchBackbone
from mixgrpo.core.types import Conditioning

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
FLUX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3
DEFAULTS_FILE = "mixgrpo.json"
CFG_GRADIENTS = ("conditional", "both")


# -- helpers shared with the sd3 backbone ----------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def default_device(device: str | torch.device | None) -> torch.device:
    """``device``, or this process's GPU (``LOCAL_RANK`` under accelerate) when there is one, else CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def model_dir(path: str | os.PathLike, what: str) -> Path:
    """The existing local directory ``path`` (or ``shipped:NAME``, a model shipped in the package);
    a clear error otherwise (nothing is downloaded)."""
    from mixgrpo.plugins.backbones import SHIPPED_PREFIX, resolve_model_path

    if str(path).startswith(SHIPPED_PREFIX):
        return resolve_model_path(path)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{what} model directory {str(path)!r} does not exist. mixgrpo loads models from local "
            "paths only and never downloads from the Hugging Face Hub: download a diffusers-format "
            "snapshot first (e.g. `huggingface-cli download <repo> --local-dir /models/<name>`) and "
            "pass that directory as path=..."
        )
    return root


def component(root: Path, name: str, what: str, required: bool = True) -> Path | None:
    sub = root / name
    if sub.is_dir():
        return sub
    if required:
        raise FileNotFoundError(f"{root} has no {name}/ folder ({what}); is it a diffusers-format {what} "
                                f"snapshot? Found: {sorted(p.name for p in root.iterdir())}")
    return None


def check_model_class(folder: Path, expected: str, backbone: str) -> None:
    """A clear error when ``folder`` holds another model family than the backbone loads (diffusers
    would otherwise load what it can and initialise the rest at random)."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: an incomplete diffusers snapshot (copy the whole "
                                "folder again)")
    found = json.loads(config.read_text()).get("_class_name")
    if found and found != expected:
        hint = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}.get(found)
        fix = f"use TrainConfig.backbone = '{hint}'" if hint else f"the {backbone!r} backbone needs a {expected}"
        raise ValueError(f"{folder} holds a {found}, but the {backbone!r} backbone loads a {expected}: {fix}")


def read_defaults(root: Path) -> dict[str, Any]:
    file = root / DEFAULTS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def quantize_sigma(sigma: torch.Tensor, levels: int | None) -> torch.Tensor:
    """``floor(levels·σ)/levels`` (the MixGRPO/DanceGRPO timestep), or σ itself when ``levels`` is None."""
    if levels is None:
        return sigma
    return (torch.floor(sigma.double() * levels) / levels).to(sigma.dtype)


def add_lora(module: nn.Module, rank: int, alpha: float | None, targets: Sequence[str]) -> nn.Module:
    """``module`` wrapped by peft with LoRA adapters (base weights frozen, B initialised to 0)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha,
                        target_modules=list(targets), init_lora_weights=True)
    return get_peft_model(module, config)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a peft-wrapped model with the active LoRA deltas merged, in the base's key names.

    Computed out of place: the live weights are never touched (merge/unmerge in bf16 would not
    restore them bit-for-bit, and the rollout's log-probs must stay reproducible).
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    for name, layer in base.named_modules():
        if isinstance(layer, LoraLayer):
            weight = layer.get_base_layer().weight
            delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters)
            state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return {k: v.detach().contiguous() for k, v in state.items()}


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


def tokenize(tokenizer: Any, prompts: list[str], length: int) -> dict[str, torch.Tensor]:
    """Token ids and mask padded (and truncated) to exactly ``length``, so a prompt's features never
    depend on the other prompts of its batch."""
    full = tokenizer(prompts, truncation=False)["input_ids"]
    cut = [p for p, ids in zip(prompts, full, strict=True) if len(ids) > length]
    if cut:
        log.warning("%d prompt(s) truncated to %d tokens, e.g. %r", len(cut), length, cut[0])
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# -- the shared diffusers backbone -----------------------------------------------------------------
class DiffusersBackbone(TorchBackbone):
    """What the diffusers-format backbones share: dtype and devices, LoRA, CFG with the empty prompt,
    timestep quantization, VAE decoding and saving the transformer. Subclasses set the transformer,
    encoders and latent layout, and implement ``encode`` and ``_forward``."""

    default_lora_targets: ClassVar[tuple[str, ...]] = FLUX_LORA_TARGETS
    #: the diffusers pipeline class that loads this backbone's exports (``mixgrpo export``)
    diffusers_pipeline: ClassVar[str | None] = None

    dtype: torch.dtype
    cfg_scale: float
    timestep_quantization: int | None
    vae: nn.Module | None = None
    frozen: dict[str, nn.Module]
    _negative: Conditioning | None = None

    def _set_guidance(self, cfg_scale: float, cfg_gradient: str) -> None:
        if cfg_gradient not in CFG_GRADIENTS:
            raise ValueError(f"cfg_gradient must be one of {', '.join(CFG_GRADIENTS)}, got {cfg_gradient!r}")
        self.cfg_scale, self.cfg_gradient = float(cfg_scale), cfg_gradient

    @property
    def calls_per_velocity(self) -> int:
        return 2 if self.cfg_scale > 1.0 else 1

    @staticmethod
    def transformer_load_dtype(dtype: torch.dtype, lora_rank: int) -> torch.dtype:
        """The dtype the transformer's weights are held in: fp32 master weights when they train
        (full fine-tuning), the compute dtype when they are frozen under LoRA (whose adapters peft
        keeps in fp32). The forward runs in the compute dtype under autocast either way."""
        return torch.float32 if lora_rank == 0 else dtype

    def _setup_transformer(self, transformer: nn.Module, device: torch.device, lora_rank: int,
                           lora_alpha: float | None, lora_targets: Sequence[str] | None,
                           gradient_checkpointing: bool) -> None:
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}")
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        held = self.transformer_load_dtype(self.dtype, lora_rank)
        if next(transformer.parameters()).dtype != held:  # loaded in another dtype by the caller
            transformer.to(dtype=held)
        transformer.to(device).eval()
        if lora_rank > 0:
            transformer = add_lora(transformer, lora_rank, lora_alpha, lora_targets or self.default_lora_targets)
        else:
            transformer.requires_grad_(True)
        self.lora_rank = lora_rank
        self.module = transformer
        for m in self.frozen.values():
            m.requires_grad_(False).eval().to(device)

    def freeze_reference(self) -> None:
        """The frozen copy of a full fine-tune is held in the compute dtype (its forward runs in it
        anyway), half the memory of the fp32 master weights."""
        super().freeze_reference()
        if self._reference_module is not None:
            self._reference_module.to(self.dtype)

    def _sync_devices(self) -> torch.device:
        """Frozen components follow the transformer (which the trainer may move)."""
        device = self.device
        for m in self.frozen.values():
            if module_device(m) != device:
                m.to(device)
        return device

    def _timestep(self, sigma: torch.Tensor, batch: int) -> torch.Tensor:
        sigma = sigma.reshape(-1).float()
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        if sigma.numel() != batch:
            raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}")
        return quantize_sigma(sigma, self.timestep_quantization)

    def negative(self) -> Conditioning:
        """The empty-prompt conditioning used for classifier-free guidance (encoded once)."""
        if self._negative is None or self._negative.embeds.device != self.device:
            self._negative = self.encode([""])
        return self._negative

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``v ≈ ε − x0`` ``[B, *latent_shape]`` fp32; with ``cfg_scale > 1`` one doubled batch (2 NFE).

        The transformer runs under autocast in the compute dtype (its trainable weights are fp32
        master weights). With guidance and gradients enabled, ``cfg_gradient="conditional"`` (the
        default, FlowGRPO's) detaches the unconditional branch, so ``dv/dθ = s·dv_c/dθ``; ``"both"``
        lets the gradient through both branches (``s·dv_c − (s−1)·dv_u``). The value is the same.
        """
        batch = x.shape[0]
        device = self.device
        t = self._timestep(sigma.to(device), batch)
        x = x.to(device=device, dtype=self.dtype)
        embeds, pooled = cond.embeds.to(device, self.dtype), cond.pooled.to(device, self.dtype)
        if self.cfg_scale > 1.0:
            neg = self.negative()
            embeds = torch.cat([neg.embeds.to(self.dtype).expand(batch, -1, -1), embeds])
            pooled = torch.cat([neg.pooled.to(self.dtype).expand(batch, -1), pooled])
            x, t = torch.cat([x, x]), torch.cat([t, t])
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            v = self._forward(x, t, embeds, pooled).float()
        if self.cfg_scale > 1.0:
            v_uncond, v_cond = v.chunk(2)
            if self.cfg_gradient == "conditional":
                v_uncond = v_uncond.detach()
            v = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        return v

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        """One transformer call on unpacked latents (model dtype); ``t`` is the (quantized) σ."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``[B, 3, H, W]`` in [0, 1] fp32 (VAE decode, or pixels scaled from [−1, 1])."""
        if self.vae is None:
            return ((latents.float() + 1) / 2).clamp(0, 1)
        self._sync_devices()
        cfg = self.vae.config
        z = latents.to(self.device, self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        image = self.vae.decode(z, return_dict=False)[0]
        return ((image.float() + 1) / 2).clamp(0, 1).to(latents.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → latents ``[B, *latent_shape]`` fp32 (the VAE posterior's mode)."""
        x = images.float() * 2 - 1
        if self.vae is None:
            return x
        self._sync_devices()
        cfg = self.vae.config
        z = self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist.mode()
        return ((z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).to(images.device)

    def save_transformer(self, path: str | os.PathLike) -> Path:
        """Write the transformer (LoRA merged in) to ``path`` in diffusers format (safetensors)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        model = self.unwrapped()
        if not hasattr(model, "get_base_model"):
            model.save_pretrained(out, safe_serialization=True)
            return out
        model.get_base_model().save_config(out)
        save_file(merged_state_dict(model), str(out / "diffusion_pytorch_model.safetensors"))
        return out


# -- FLUX ------------------------------------------------------------------------------------------
class FluxBackbone(DiffusersBackbone):
    """FLUX.1 (or the tiny shapes-world FLUX) from a local diffusers-format directory.

    Args:
        path: local directory (see the module docstring for its layout). Never a hub id: nothing
            is downloaded.
        height, width: image size in pixels. Default: ``mixgrpo.json`` in ``path`` if present,
            else 32 in pixel space and 1024 with a VAE. Must be multiples of the patch size in
            pixel space (of 2× the VAE's downsampling factor with a VAE).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the compute dtype. Text encoders and
            VAE are held and run in it; the transformer runs in it under autocast, while its trainable
            weights (full fine-tuning) stay fp32 master weights, so that small updates and weight
            decay are not rounded away (LoRA: the frozen base is held in this dtype, the adapters in
            fp32). Step math stays fp32: ``velocity`` returns fp32.
        guidance: the embedded guidance value passed to guidance-distilled transformers
            (``transformer.config.guidance_embeds``, FLUX.1-dev); ignored otherwise.
        cfg_scale: true classifier-free guidance against the empty prompt when > 1:
            ``v = v_u + s·(v_c − v_u)``. ``velocity`` then runs a doubled batch, so every model call
            costs two network evaluations (NFE doubles).
        cfg_gradient: with guidance, ``"conditional"`` (default) trains through the conditional
            branch only (the unconditional prediction is detached, as FlowGRPO does); ``"both"``
            differentiates the guided velocity through both branches.
        timestep_quantization: None feeds the network the exact σ; an integer q feeds
            ``floor(q·σ)/q`` (q = 1000 reproduces the MixGRPO/DanceGRPO references).
        max_sequence_length: T5 tokens per prompt (77; FLUX.1-dev is usually run with 512).
            Without T5 the CLIP sequence is used, capped by the CLIP context length.
        lora_rank: 0 trains the whole transformer; r > 0 wraps it with peft LoRA of rank r on
            ``lora_targets`` (only the adapters train, and ``reference()`` is the adapter-disabled
            model).
        lora_alpha: LoRA alpha (default ``2·lora_rank``).
        lora_targets: module names LoRA adapts (default ``to_q, to_k, to_v, to_out.0``).
        gradient_checkpointing: recompute transformer blocks in the backward pass (memory for time).
        device: where the model lives; default this process's GPU if there is one, else the CPU.
    """

    diffusers_pipeline = "FluxPipeline"

    def __init__(self, path: str, height: int | None = None, width: int | None = None,
                 dtype: str = "float32", guidance: float = 3.5, cfg_scale: float = 1.0,
                 cfg_gradient: str = "conditional", timestep_quantization: int | None = None,
                 max_sequence_length: int = 77,
                 lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] | None = None, gradient_checkpointing: bool = False,
                 device: str | None = None) -> None:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        root = model_dir(path, "FLUX")
        self.path = root
        self.dtype = resolve_dtype(dtype)
        self.guidance = float(guidance)
        self._set_guidance(cfg_scale, cfg_gradient)
        self.timestep_quantization = timestep_quantization
        load = {"dtype": self.dtype, "local_files_only": True}
        check_model_class(component(root, "transformer", "FLUX transformer"), "FluxTransformer2DModel", "flux")
        transformer = FluxTransformer2DModel.from_pretrained(
            component(root, "transformer", "FLUX transformer"), local_files_only=True,
            dtype=self.transformer_load_dtype(self.dtype, lora_rank))
        self.config = transformer.config
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
        self._set_sequence_lengths(max_sequence_length)
        self._set_latent_layout(root, height, width)
        self._setup_transformer(transformer, default_device(device), lora_rank, lora_alpha, lora_targets,
                                gradient_checkpointing)

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

    def _set_sequence_lengths(self, max_sequence_length: int) -> None:
        limit = self.text_encoder.config.max_position_embeddings
        tok_max = self.tokenizer.model_max_length
        self.clip_length = min(limit, tok_max) if tok_max and tok_max < 10**6 else limit
        self.max_sequence_length = int(max_sequence_length)
        if self.text_encoder_2 is None:
            self.clip_length = min(self.clip_length, self.max_sequence_length)

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
        out = self.module(
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


# -- a tiny FLUX with random weights ---------------------------------------------------------------
DEFAULT_VOCAB = (
    "a an the of and with on in at to is are photo picture image one two three four five six "
    "red green blue yellow orange purple pink white black gray brown cyan "
    "circle circles square squares triangle triangles star stars cross crosses ring rings "
    "shape shapes object objects left right top bottom above below next middle center corner "
    "upper lower side big small large tiny , ."
).split()


def build_word_tokenizer(vocab: Sequence[str], max_length: int, bos: bool = True) -> Any:
    """A lower-casing word-level ``PreTrainedTokenizerFast`` over ``SPECIAL_TOKENS + vocab``.

    Every encoding is ``[BOS] words… [EOS]`` (``words… [EOS]`` when ``bos`` is False, T5 style),
    padded with ``[PAD]`` (id 0); unknown words map to ``[UNK]`` (id 1).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS) + [w for w in dict.fromkeys(w.lower() for w in vocab) if w not in SPECIAL_TOKENS]
    ids = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "[BOS] $A [EOS]" if bos else "$A [EOS]"
    tok.post_processor = processors.TemplateProcessing(
        single=template, pair=f"{template} $B [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]", model_max_length=max_length)


def save_tokenizer(tokenizer: Any, path: Path) -> None:
    """Save a word-level tokenizer under the class name every transformers version knows (4.x and 5.x)."""
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def tiny_clip_config(vocab_size: int, dim: int, layers: int, max_length: int, projection_dim: int | None = None):
    """A small ``CLIPTextConfig`` whose pooled output is the first ``[EOS]`` (id 3, not 2, so transformers
    takes the ``eos_token_id`` path instead of the legacy argmax one)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=4 * dim,
                          num_hidden_layers=layers, num_attention_heads=max(1, dim // 16),
                          max_position_embeddings=max_length, projection_dim=projection_dim or dim,
                          pad_token_id=0, bos_token_id=2, eos_token_id=3)


def tiny_t5(vocab_size: int, dim: int):
    from transformers import T5Config, T5EncoderModel

    heads = max(1, dim // 16)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=dim, d_kv=dim // heads, d_ff=2 * dim,
                                   num_layers=1, num_heads=heads, relative_attention_num_buckets=8,
                                   pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))


def tiny_vae(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (8, 16)):
    """A tiny ``AutoencoderKL`` (downsampling 2^(len(blocks)−1)) with non-trivial scale and shift."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=block_out_channels,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                         scaling_factor=0.5, shift_factor=0.1)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary axes dims summing to ``head_dim`` in FLUX's proportions (16, 56, 56 for 128); all even."""
    if head_dim % 4:
        raise ValueError(f"attention_head_dim must be a multiple of 4, got {head_dim}")
    first = max(2, head_dim // 8 // 2 * 2)
    second = (head_dim - first) // 4 * 2
    return first, second, head_dim - first - second


def build_tiny_flux(path: str | os.PathLike, *, vocab: Sequence[str] | None = None, image_size: int = 32,
                    patch: int = 4, num_layers: int = 2, num_single_layers: int = 4, attention_head_dim: int = 32,
                    num_attention_heads: int = 4, text_dim: int = 64, text_layers: int = 1, seed: int = 0,
                    with_vae: bool = False, with_t5: bool = False, t5_dim: int | None = None,
                    max_text_length: int = 32) -> Path:
    """Write a complete, loadable FLUX directory with random weights of the real classes.

    The transformer is a ``FluxTransformer2DModel`` with ``num_layers`` double and
    ``num_single_layers`` single blocks (``guidance_embeds=False``); the text encoder a
    ``CLIPTextModel`` of width ``text_dim`` with a word-level tokenizer over ``vocab`` (default:
    ``DEFAULT_VOCAB``, the shapes-world words) and a context of ``max_text_length`` tokens.
    Without a VAE the model works on ``image_size``² RGB pixels packed in ``patch``² patches
    (``in_channels = 3·patch²``); ``with_vae`` adds a tiny ``AutoencoderKL`` (4 latent channels,
    downsampling 2, packed 2×2; ``patch`` is then unused); ``with_t5`` adds a tiny
    ``T5EncoderModel`` of width ``t5_dim`` (default ``text_dim``) as the sequence encoder.

    Returns:
        ``path`` (created), loadable with ``FluxBackbone(path)``.
    """
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    words = list(vocab) if vocab is not None else list(DEFAULT_VOCAB)
    tokenizer = build_word_tokenizer(words, max_text_length)
    vocab_size = len(tokenizer)
    seq_dim = (t5_dim or text_dim) if with_t5 else text_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        in_channels = 3 * patch * patch
        if with_vae:
            vae = tiny_vae()
            in_channels = 4 * vae.config.latent_channels
            vae.save_pretrained(root / "vae")
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=in_channels, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=seq_dim, pooled_projection_dim=text_dim, guidance_embeds=False,
            axes_dims_rope=rope_axes(attention_head_dim))
        transformer.save_pretrained(root / "transformer")
        CLIPTextModel(tiny_clip_config(vocab_size, text_dim, text_layers, max_text_length)).save_pretrained(
            root / "text_encoder")
        save_tokenizer(tokenizer, root / "tokenizer")
        if with_t5:
            tiny_t5(vocab_size, seq_dim).save_pretrained(root / "text_encoder_2")
            save_tokenizer(build_word_tokenizer(words, 512, bos=False), root / "tokenizer_2")
    (root / DEFAULTS_FILE).write_text(json.dumps({"height": image_size, "width": image_size}, indent=2) + "\n")
    return root


@hookimpl
def register_backbones(register):
    register("flux", FluxBackbone)
