"""What the diffusers-format backbones share: dtypes and devices, local model folders, LoRA, latent
packing, tokenizing, and ``DiffusersBackbone`` (CFG, autocast compute over fp32 master weights,
timestep quantization, VAE decoding, saving the transformer). ``flux.py`` and ``sd3.py`` build on it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mixgrpo.core.interfaces import TorchBackbone
from mixgrpo.core.types import Conditioning

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
FLUX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULTS_FILE = "mixgrpo.json"
CFG_GRADIENTS = ("conditional", "both")


# -- helpers ---------------------------------------------------------------------------------------
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
