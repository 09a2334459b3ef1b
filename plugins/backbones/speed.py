"""Speed options of the diffusers backbones: diffusers' attention backends, checked against what is
installed and the device before anything loads, and set on one transformer only (``torch.compile``
of the repeated blocks is ``DiffusersBackbone._network``)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from mixgrpo.core.progress import quiet


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
        with quiet(diffusers_log, "Attention backends are an experimental feature"):
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
