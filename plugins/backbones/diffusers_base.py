"""What the diffusers-format backbones share: dtypes and devices, local model folders, LoRA, latent
packing, tokenizing, and ``DiffusersBackbone`` (CFG, autocast compute over fp32 master weights,
timestep quantization, VAE decoding, saving the transformer). ``flux.py`` and ``sd3.py`` build on it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
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


# -- speed options: attention backend, torch.compile -----------------------------------------------
def _backend_problem(name: str, device: torch.device) -> str | None:
    """Why diffusers' attention backend ``name`` cannot run here (None when it can)."""
    from diffusers.models import attention_dispatch as dispatch

    backend = dispatch.AttentionBackendName(name)
    if name.endswith("_hub"):
        return "it downloads its kernel from the Hugging Face Hub, and mixgrpo never downloads"
    try:
        dispatch._check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as exc:
        return str(exc)
    checks = {getattr(c, "__name__", "") for c in dispatch._AttentionBackendRegistry._constraints.get(backend, [])}
    cuda_only = (name.startswith(("flash", "_flash", "sage", "_sage", "aiter")) or "_check_device_cuda" in checks
                 or "check_device_cuda" in checks or name in ("_native_cudnn", "_native_efficient"))
    if cuda_only and device.type != "cuda":
        return f"it runs on CUDA only, and this backbone is on {device.type}"
    if name in ("_native_npu", "_native_xla") and device.type not in ("npu", "xla"):
        return f"it runs on {name.removeprefix('_native_').upper()} devices only"
    return None


def attention_backends(device: torch.device) -> list[str]:
    """The names of diffusers' attention backends that can run on ``device`` with what is installed."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName if _backend_problem(b.value, device) is None]


def check_attention_backend(name: str | None, device: torch.device) -> str | None:
    """``name`` (lower case) when diffusers' attention backend of that name can run on ``device``;
    None keeps diffusers' default (PyTorch SDPA). Checked before any weight is loaded, with a
    message naming the backends that can run here."""
    if name is None:
        return None
    from diffusers.models.attention_dispatch import AttentionBackendName

    name = str(name).lower()
    known = [b.value for b in AttentionBackendName]
    if name not in known:
        raise ValueError(f"unknown attention_backend {name!r}; diffusers' attention backends are "
                         f"{', '.join(known)} (None = PyTorch SDPA, the default)")
    problem = _backend_problem(name, device)
    if problem:
        raise ValueError(f"attention_backend {name!r} cannot run here: {problem.rstrip('.')}. Available on "
                         f"{device.type}: {', '.join(attention_backends(device))} (or None, PyTorch SDPA)")
    return name


def set_attention_backend(transformer: nn.Module, name: str) -> None:
    """Route the transformer's attention through diffusers' backend ``name`` (checked by
    ``check_attention_backend``), leaving every other model of the process as it was: diffusers'
    ``set_attention_backend`` also makes ``name`` the process-wide default, which is undone here.

    Transformers whose attention processors call PyTorch SDPA directly (SD3 in diffusers 0.42)
    take ``'xformers'`` through diffusers' xformers processors and refuse the other backends."""
    from diffusers.models import attention_dispatch as dispatch

    registry = dispatch._AttentionBackendRegistry
    before = registry._active_backend
    try:
        diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
        with _quiet(diffusers_log, "Attention backends are an experimental feature"):
            transformer.set_attention_backend(name)
    finally:
        registry.set_active_backend(before)
    processors = [getattr(m, "processor", None) for m in transformer.modules()]
    if any(getattr(p, "_attention_backend", None) == name for p in processors):
        return
    if name == "xformers" and hasattr(transformer, "enable_xformers_memory_efficient_attention"):
        transformer.enable_xformers_memory_efficient_attention()
        return
    kinds = sorted({type(p).__name__ for p in processors if p is not None})
    raise ValueError(f"{type(transformer).__name__}'s attention processors ({', '.join(kinds)}) call PyTorch SDPA "
                     f"directly and do not dispatch to diffusers' attention backends: attention_backend={name!r} "
                     "would change nothing. Use None (PyTorch SDPA) or 'xformers' (diffusers' xformers processors).")


class _quiet:
    """Drop the records of ``logger`` whose message starts with ``prefix`` (and no other) while active."""

    def __init__(self, logger: logging.Logger, prefix: str) -> None:
        self.logger, self.prefix = logger, prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)

    def __enter__(self) -> None:
        self.logger.addFilter(self)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)


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
    attention_backend: str | None = None
    compile: str = "none"
    _compiled: dict[int, tuple[nn.Module, list[tuple[nn.Module, Callable[..., Any]]]]] | None = None
    #: the transformer blocks ``compile`` compiles when the model names none (``_repeated_blocks``)
    compile_blocks: ClassVar[tuple[str, ...]] = ()

    def _set_speed_options(self, attention_backend: str | None, compile: str,  # noqa: A002 (gin name)
                           device: str | torch.device | None) -> None:
        """Check the speed options before anything is loaded (see ``FluxBackbone``'s arguments)."""
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
        """The transformer for this forward, its repeated blocks ``torch.compile``'d where ``compile``
        says so (``'rollout'``: forwards without gradients, i.e. rollout, evaluation and the KL
        reference; ``'all'``: every forward, training's included). Regional compilation, as
        diffusers' ``compile_repeated_blocks``: each kind of block compiles once however deep the
        model, and the code between blocks stays eager. The compiled blocks are kept per module, so a
        module the trainer wraps or swaps in (DDP, the frozen reference) gets its own."""
        module = self.module
        if self.compile != "none":
            use = self.compile == "all" or not torch.is_grad_enabled()
            for block, compiled in self._compiled_blocks(module):
                block._compiled_call_impl = compiled if use else None  # what nn.Module.compile sets
        return module

    def _compiled_blocks(self, module: nn.Module) -> list[tuple[nn.Module, Callable[..., Any]]]:
        if self._compiled is None:
            self._compiled = {}
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
        self.lora_rank = lora_rank
        self.module = transformer
        for m in self.frozen.values():
            m.requires_grad_(False).eval().to(device)

    def freeze_reference(self) -> None:
        """The frozen copy of a full fine-tune is held in the compute dtype (its forward runs in it
        anyway), half the memory of the fp32 master weights."""
        for _, compiled in (self._compiled or {}).values():  # the copy must not call the live blocks' code
            for block, _ in compiled:
                block._compiled_call_impl = None
        super().freeze_reference()
        if self._reference_module is not None:
            cast(self._reference_module, self.dtype)

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

        from mixgrpo.core.checkpoint import share_like_open

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        model = self.unwrapped()
        if not hasattr(model, "get_base_model"):
            model.save_pretrained(out, safe_serialization=True)
        else:
            model.get_base_model().save_config(out)
            save_file(merged_state_dict(model), str(out / "diffusion_pytorch_model.safetensors"))
        share_like_open(out)  # safetensors writes 0600; a shared model folder must be readable
        return out
