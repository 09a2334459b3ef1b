"""A tiny FLUX.1-Kontext snapshot with random weights of the real classes, written as
``FluxKontextPipeline.save_pretrained`` writes the published one, so that both the ``flux_kontext``
backbone and diffusers' own pipeline load it: the tests' stand-in for FLUX.1-Kontext-dev (nothing is
downloaded).

It is ``build_tiny_flux``'s FLUX (CLIP + T5 + a tiny VAE) with the two things that make it
Kontext-dev's: a guidance-distilled transformer (``guidance_embeds=True``) and Kontext-dev's
scheduler, FLUX's dynamic shifting (``mu`` from the image token count), which the pipeline's grid uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mixgrpo.plugins.backbones.tiny import _save_pipeline, build_tiny_flux

#: FLUX.1-Kontext-dev's ``scheduler/scheduler_config.json`` (FlowMatchEulerDiscreteScheduler)
KONTEXT_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                     "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def build_tiny_kontext(path: str | os.PathLike, *, image_size: int = 32, num_layers: int = 1,
                       num_single_layers: int = 1, t5_dim: int = 48, max_text_length: int = 32,
                       seed: int = 0) -> Path:
    """Write a loadable FLUX.1-Kontext snapshot at ``path``: ``build_tiny_flux`` with a VAE and a T5 of
    width ``t5_dim``, its transformer rebuilt with embedded guidance (random weights under ``seed``),
    ``model_index.json`` for ``FluxKontextPipeline`` and Kontext-dev's dynamic-shift scheduler.
    ``mixgrpo.json`` keeps the default image size ``image_size`` (the backbone's; the pipeline is
    given its size). Returns ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    root = build_tiny_flux(path, image_size=image_size, num_layers=num_layers, num_single_layers=num_single_layers,
                           with_vae=True, with_t5=True, t5_dim=t5_dim, max_text_length=max_text_length, seed=seed)
    config = dict(FluxTransformer2DModel.load_config(root / "transformer"), guidance_embeds=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        FluxTransformer2DModel.from_config(config).save_pretrained(root / "transformer")
    _save_pipeline(root, "FluxKontextPipeline")
    FlowMatchEulerDiscreteScheduler(**KONTEXT_SCHEDULER).save_pretrained(root / "scheduler")
    return root
