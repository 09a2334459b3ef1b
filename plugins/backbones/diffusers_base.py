"""What the diffusers-format backbones share: dtypes and devices, local model folders, LoRA,
tokenizing, and ``DiffusersBackbone`` (loading, CFG, autocast compute over fp32 master
weights, timestep quantization, VAE decoding, the frozen reference, exporting and saving the
transformer). ``flux.py`` and ``sd3.py`` build on it; the attention backends are in ``speed.py``, the
diffusers export formats in ``diffusers_export.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mixgrpo.core.interfaces import ModelFacts, TorchBackbone
from mixgrpo.core.types import Conditioning
from mixgrpo.plugins.backbones import diffusers_export, resolve_model_path
from mixgrpo.plugins.backbones.speed import attention_backends as attention_backends  # re-exported
from mixgrpo.plugins.backbones.speed import check_attention_backend, set_attention_backend

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
FLUX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULTS_FILE = "mixgrpo.json"
CFG_GRADIENTS = ("conditional", "both")
#: ``compile``: where the transformer's forward runs under ``torch.compile`` (docs/design.md)
COMPILE_MODES = ("none", "rollout", "all")


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


#: the backbone that loads each diffusers transformer class (the hint of ``check_model_class``)
FAMILIES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
            "QwenImageTransformer2DModel": "qwenimage", "Flux2Transformer2DModel": "flux2",
            "ZImageTransformer2DModel": "zimage"}


def check_model_class(folder: Path, expected: str, backbone: str) -> None:
    """A clear error when ``folder`` holds another model family than the backbone loads (diffusers
    would otherwise load what it can and initialise the rest at random)."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: an incomplete diffusers snapshot (copy the whole "
                                "folder again)")
    found = json.loads(config.read_text()).get("_class_name")
    if found and found != expected:
        hint = FAMILIES.get(found)
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


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` in place, keeping a diffusers model's ``_keep_in_fp32_modules`` in fp32 as
    ``from_pretrained`` does, without the warning diffusers' ``ModelMixin.to`` prints on every dtype
    cast (even when that list is empty, as for FLUX and SD3)."""
    nn.Module.to(module, dtype=dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if keep and dtype != torch.float32:
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                nn.Module.to(sub, dtype=torch.float32)
    return module


# -- the shared diffusers backbone -----------------------------------------------------------------
class DiffusersBackbone(TorchBackbone):
    """What the diffusers-format backbones share: loading from a local folder, dtype and devices,
    LoRA, CFG with the empty prompt, timestep quantization, VAE decoding, the frozen reference, and
    exporting for the diffusers pipeline. A subclass names its model (the class attributes below),
    loads its text encoders and VAE (``_load_components``), sets its latent layout
    (``_set_latent_layout``), and implements ``encode`` and ``_forward``; its constructor sets its
    own options, then calls this one with the shared arguments (gin binds them by the subclass's
    name, e.g. ``FluxBackbone.lora_rank``).

    Args (shared by every diffusers backbone):
        path: local diffusers-format directory (see the subclass's module docstring for its layout).
            Never a hub id: nothing is downloaded.
        height, width: image size in pixels. Default: ``mixgrpo.json`` in ``path`` if present, else
            the subclass's fallback. Multiples of the latent patch size in pixels.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the compute dtype. Text encoders (and the VAE,
            unless the subclass sets its own dtype) are held and run in it; the transformer runs in it under
            autocast, while its trainable weights (full fine-tuning) stay fp32 master weights, so that small
            updates and weight decay are not rounded away (LoRA: the frozen base is held in this dtype, the
            adapters in fp32). Step math stays fp32: ``velocity`` takes and returns fp32.
        cfg_scale: classifier-free guidance against the empty prompt when > 1: ``v = v_u + s·(v_c − v_u)``
            (the hook ``combine_guidance``). ``velocity`` then runs a doubled batch, so every model call costs
            two network evaluations (NFE doubles); 1 disables guidance.
        cfg_gradient: with guidance, ``"conditional"`` (default, FlowGRPO's) trains through the
            conditional branch only (the unconditional prediction is detached, so the gradient is
            ``s·dv_c/dθ``); ``"both"`` differentiates the guided velocity through both branches.
        timestep_quantization: None feeds the network the exact σ; an integer q feeds
            ``floor(q·σ)/q`` (q = 1000 reproduces the MixGRPO/DanceGRPO references).
        lora_rank: 0 trains the whole transformer; r > 0 wraps it with peft LoRA of rank r on ``lora_targets``
            (only the adapters train, and ``reference()`` is the adapter-disabled model).
        lora_alpha: LoRA alpha (default ``2·lora_rank``).
        lora_targets: module names LoRA adapts (default: the subclass's ``default_lora_targets``).
        gradient_checkpointing: recompute transformer blocks in the backward pass (memory for time).
        attention_backend: None (default) runs attention through PyTorch SDPA, diffusers' default; otherwise
            the name of one of diffusers' attention backends (``'xformers'``, ``'flash'``, ``'_native_flash'``,
            ``'_native_math'``, ``'flex'``, ``'sage'``, ...; ``diffusers.models.attention_dispatch.
            AttentionBackendName``). Checked before anything is loaded: one not installed, needing another
            device or downloading a kernel is refused with those that can run here. Set on this transformer only.
        compile: ``'none'`` (default); ``'all'``: ``torch.compile`` the transformer for every forward
            (rollout and training compute identical log-probs, also in bf16); ``'rollout'``: only the
            forwards without gradients (rollout, evaluation, KL reference), fp32 only (docs/design.md).
        device: where the model lives; default this process's GPU if there is one, else the CPU.
    """

    #: the backbone's registered name (a tag of the model card), its model's name in messages, the
    #: diffusers class of its transformer, and the diffusers pipeline that loads its exports
    family: ClassVar[str]
    model_name: ClassVar[str]
    transformer_class: ClassVar[str]
    diffusers_pipeline: ClassVar[str]
    default_lora_targets: ClassVar[tuple[str, ...]] = FLUX_LORA_TARGETS

    path: Path
    height: int
    width: int
    cfg_scale: float
    timestep_quantization: int | None
    vae: nn.Module | None = None
    frozen: dict[str, nn.Module]
    _negative: Conditioning | None = None
    attention_backend: str | None = None
    compile: str = "none"
    _compiled: dict[int, tuple[nn.Module, list[tuple[nn.Module, Callable[..., Any]]]]] | None = None
    #: the transformer blocks ``compile`` compiles when the model names none (``_repeated_blocks``)
    compile_blocks: ClassVar[tuple[str, ...]] = ()
    negative_prompt: str = ""  # the prompt of guidance's other branch (a subclass may take it as an argument)

    def __init__(self, path: str, height: int | None, width: int | None, *, dtype: str, cfg_scale: float,
                 cfg_gradient: str, timestep_quantization: int | None, lora_rank: int, lora_alpha: float | None,
                 lora_targets: Sequence[str] | None, gradient_checkpointing: bool, attention_backend: str | None,
                 compile: str, device: str | None) -> None:  # noqa: A002 (gin name)
        import diffusers

        self.dtype = resolve_dtype(dtype)
        self._set_speed_options(attention_backend, compile, device)  # before anything is read or loaded
        root = self.path = resolve_model_path(path, self.model_name)
        self._set_guidance(cfg_scale, cfg_gradient)
        self.timestep_quantization = timestep_quantization
        folder = component(root, "transformer", f"{self.model_name} transformer")
        check_model_class(folder, self.transformer_class, self.family)
        transformer = getattr(diffusers, self.transformer_class).from_pretrained(
            folder, local_files_only=True, dtype=self.transformer_load_dtype(self.dtype, lora_rank))
        self.config = transformer.config
        self._load_components(root, {"dtype": self.dtype, "local_files_only": True})
        self._set_latent_layout(root, height, width)
        self._setup_transformer(transformer, default_device(device), lora_rank, lora_alpha, lora_targets,
                                gradient_checkpointing)

    def _load_components(self, root: Path, load: dict[str, Any]) -> None:
        """Load the text encoders, tokenizers and VAE from ``root`` (``from_pretrained(..., **load)``)
        into ``self.frozen``, and check they fit the transformer (``self.config``)."""
        raise NotImplementedError

    def _set_latent_layout(self, root: Path, height: int | None, width: int | None) -> None:
        """Set ``height``, ``width`` and the latent shape (checked against the transformer and VAE)."""
        raise NotImplementedError

    def _set_speed_options(self, attention_backend: str | None, compile: str,  # noqa: A002 (gin name)
                           device: str | torch.device | None) -> None:
        """Check the speed options before anything is loaded (see the class's arguments)."""
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        if compile == "rollout" and self.dtype != torch.float32:
            raise ValueError(
                f"compile='rollout' with dtype {str(self.dtype).removeprefix('torch.')}: the compiled rollout and "
                "the eager training forward round differently below fp32 (on-policy ratio off by 2e-6 on the tiny "
                "FLUX, against 1e-6 allowed), so the rollout's log-probs would not be the policy's. Use "
                "compile='all' (rollout and training compiled alike: ratio exactly 1) or dtype='float32'.")
        self.compile = compile
        self.attention_backend = check_attention_backend(attention_backend, default_device(device))

    def _network(self) -> nn.Module:
        """The transformer for this forward, its repeated blocks ``torch.compile``'d where ``compile`` says
        so (``'rollout'``: forwards without gradients, i.e. rollout, evaluation and the KL reference;
        ``'all'``: every forward, training's included). Regional compilation, as diffusers'
        ``compile_repeated_blocks``: each kind of block compiles once however deep the model, the code between
        blocks stays eager. Kept per module: one the trainer wraps or swaps in (DDP, the reference) gets its own."""
        module = self.module
        if self.compile != "none":
            use = self.compile == "all" or not torch.is_grad_enabled()
            for block, compiled in self._compiled_blocks(module):
                block._compiled_call_impl = compiled if use else None  # what nn.Module.compile sets
        return module

    def _compiled_blocks(self, module: nn.Module) -> list[tuple[nn.Module, Callable[..., Any]]]:
        self._compiled = {} if self._compiled is None else self._compiled
        cached = self._compiled.get(id(module))
        if cached is None or cached[0] is not module:
            base = module
            while hasattr(base, "module") and isinstance(base.module, nn.Module):  # DDP
                base = base.module
            if hasattr(base, "get_base_model"):  # peft
                base = base.get_base_model()
            names = set(getattr(base, "_repeated_blocks", None) or self.compile_blocks)
            blocks = [m for m in base.modules() if any(c.__name__ in names for c in type(m).__mro__)] or [base]
            # below fp32, inductor rounds like eager (its fused kernels would otherwise keep fp32
            # intermediates that eager rounds), so that the inference and training graphs agree
            options = {"emulate_precision_casts": True} if self.dtype != torch.float32 else None
            cached = (module, [(b, torch.compile(b._call_impl, dynamic=False, options=options)) for b in blocks])
            self._compiled[id(module)] = cached
        return cached[1]

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
            cast(transformer, held)
        transformer.to(device).eval()
        if self.attention_backend is not None:
            set_attention_backend(transformer, self.attention_backend)
        if lora_rank > 0:
            transformer = add_lora(transformer, lora_rank, lora_alpha, lora_targets or self.default_lora_targets)
        else:
            transformer.requires_grad_(True)
        self.lora_rank, self.module = lora_rank, transformer
        for m in self.frozen.values():
            m.requires_grad_(False).eval().to(device)

    # -- the frozen reference: the adapters switched off under LoRA, else a frozen copy -------------
    def freeze_reference(self) -> None:
        """Under LoRA nothing to keep: the reference is the network with its adapters disabled. The frozen
        copy of a full fine-tune is held in the compute dtype (its forward runs in it), half the fp32's memory."""
        if self.lora_rank > 0:
            return
        for _, compiled in (self._compiled or {}).values():  # the copy must not call the live blocks' code
            for block, _ in compiled:
                block._compiled_call_impl = None
        super().freeze_reference()
        if self._reference_module is not None:
            cast(self._reference_module, self.dtype)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        # under LoRA (peft) the base is the model with its adapters off
        with self.unwrapped().disable_adapter() if self.lora_rank > 0 else super().reference():
            yield

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
        """``negative_prompt``'s conditioning for classifier-free guidance (encoded once)."""
        if self._negative is None or self._negative.embeds.device != self.device:
            self._negative = self.encode([self.negative_prompt])
        return self._negative

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``v ≈ ε − x0`` ``[B, *latent_shape]`` fp32: ``_forward`` on ``_text_inputs`` under autocast in the
        compute dtype; with ``cfg_scale > 1`` one doubled batch (2 NFE) whose halves ``combine_guidance``
        combines, the unconditional one detached first under ``cfg_gradient="conditional"``."""
        batch, device = x.shape[0], self.device
        t = sigma_t = self._timestep(sigma.to(device), batch)
        x = x.to(device=device, dtype=self.dtype)
        text = self._text_inputs(cond)
        if self.cfg_scale > 1.0:
            negative = self._text_inputs(self.negative())
            text = tuple(torch.cat([n.expand(batch, *n.shape[1:]), c]) for n, c in zip(negative, text, strict=True))
            x, t = torch.cat([x, x]), torch.cat([t, t])
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            v = self._forward(x, t, *text).float()
        if self.cfg_scale > 1.0:
            v_uncond, v_cond = v.chunk(2)
            if self.cfg_gradient == "conditional":
                v_uncond = v_uncond.detach()
            v = self.combine_guidance(v_uncond, v_cond, sigma_t)
        return v

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        """One transformer call on unpacked latents (model dtype); ``t`` is the (quantized) σ."""
        raise NotImplementedError

    # -- hooks to override instead of velocity, decode, encode_images (docs/plugins.md) -----------
    def combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided velocity from the branches ``[B, *latent_shape]`` fp32 (``v_uncond`` detached under
        ``cfg_gradient="conditional"``) at the σ ``[B]`` fed to the network. Default: ``v_u + s·(v_c − v_u)``."""
        return v_uncond + self.cfg_scale * (v_cond - v_uncond)

    def _text_inputs(self, cond: Conditioning) -> tuple[torch.Tensor, ...]:
        """The text tensors ``_forward`` takes after ``x, t``, batch first, on the device (the negative's
        go before them under guidance). Default: ``(embeds, pooled)`` in the compute dtype."""
        return cond.embeds.to(self.device, self.dtype), cond.pooled.to(self.device, self.dtype)

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The backbone's latents (VAE dtype) → the VAE's. Default: ``latents / scaling_factor + shift_factor``."""
        return latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)

    def from_vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's latents (its dtype) → the backbone's (fp32). Default: ``(z − shift_factor)·scaling_factor``."""
        return (z.float() - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's latents → images in [−1, 1]. Default: ``vae.decode``."""
        return self.vae.decode(z, return_dict=False)[0]

    def vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] → the VAE's latents. Default: ``vae.encode``'s posterior mode."""
        return self.vae.encode(x).latent_dist.mode()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``[B, 3, H, W]`` in [0, 1] fp32: ``vae_decode(to_vae_latents(·))`` (no VAE: pixels)."""
        if self.vae is None:
            return ((latents.float() + 1) / 2).clamp(0, 1)
        self._sync_devices()
        image = self.vae_decode(self.to_vae_latents(latents.to(self.device, self.vae.dtype)))
        return ((image.float() + 1) / 2).clamp(0, 1).to(latents.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → latents fp32: ``from_vae_latents(vae_encode(2·images − 1))``."""
        x = images.float() * 2 - 1
        if self.vae is None:
            return x
        self._sync_devices()
        return self.from_vae_latents(self.vae_encode(x.to(self.device, self.vae.dtype))).float().to(images.device)

    # -- publishing: the model card, ``mixgrpo export`` and ``mixgrpo sample`` --------------------
    def model_facts(self) -> ModelFacts:
        alpha = self.unwrapped().peft_config["default"].lora_alpha if self.lora_rank > 0 else None
        return ModelFacts(pipeline=self.diffusers_pipeline, family=self.family, base_model=str(self.path),
                          height=self.height, width=self.width, guidance=self.cfg_scale,
                          guidance_settings={"cfg_scale": self.cfg_scale}, lora_alpha=alpha)

    def set_guidance(self, scale: float) -> str:
        """Classifier-free guidance: ``cfg_scale``."""
        self.cfg_scale = float(scale)
        return "cfg_scale"

    def export(self, out: Path, *, max_shard_size: str | int = "5GB", load_path: str | None = None) -> dict[str, Any]:
        """The LoRA adapter (``lora_rank > 0``) as the pipeline's ``save_lora_weights`` writes it, else
        the transformer as a diffusers model folder (``plugins/backbones/diffusers_export.py``)."""
        return diffusers_export.export(self, Path(out), max_shard_size, load_path)

    def load_snippet(self, export_dir: str, prompt: str, num_steps: int) -> list[str]:
        return diffusers_export.load_snippet(self, export_dir, prompt, num_steps)

    def save_transformer(self, path: str | os.PathLike) -> Path:
        """Write the transformer (LoRA merged in) to ``path`` in diffusers format (safetensors)."""
        return diffusers_export.save_merged(self.unwrapped(), Path(path))
