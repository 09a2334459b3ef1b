"""A diffusers backbone's trained weights written the way diffusers loads them, and the model card's
snippet that loads them (``DiffusersBackbone.export``, ``load_snippet`` and ``save_transformer``):

* LoRA: the adapter, written by the pipeline class's own ``save_lora_weights``
  (``pytorch_lora_weights.safetensors``, keys ``transformer.<module>.lora_A.weight`` /
  ``lora_B.weight``, the LoRA config with its ``lora_alpha`` in the file's metadata), loaded with
  ``<Pipeline>.load_lora_weights(DIR)``;
* full fine-tuning: a transformer folder (``config.json`` + safetensors shards) that
  ``<Transformer>.from_pretrained(DIR)`` loads in place of the base model's ``transformer/``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from mixgrpo.plugins.backbones.diffusers_base import DiffusersBackbone

#: diffusers' default file name for LoRA weights (what ``load_lora_weights(DIR)`` looks for)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def pipeline_class(name: str) -> type:
    """The diffusers pipeline class of that name (``"FluxPipeline"``)."""
    import diffusers

    return getattr(diffusers, name)


def lora_layers(model: nn.Module, bake_alpha: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA weights of a peft-wrapped transformer in diffusers' names, and its LoRA config.

    Keys are the transformer's module paths (``transformer_blocks.0.attn.to_q.lora_A.weight``); the
    pipeline's ``save_lora_weights`` adds the ``transformer.`` prefix. The config (a ``LoraConfig``
    as a dict, ``lora_alpha`` included) is what diffusers stores as the adapter metadata. With
    ``bake_alpha`` the scale ``lora_alpha / r`` is multiplied into ``lora_B`` and the config says
    ``lora_alpha = r``: the same adapter for loaders that cannot read the metadata.
    """
    from peft import get_peft_model_state_dict

    if not hasattr(model, "peft_config"):
        raise ValueError("the transformer has no LoRA adapter to export")
    config = model.peft_config["default"]
    if config.rank_pattern or config.alpha_pattern or config.use_dora:
        raise ValueError("export writes plain LoRA adapters (one rank and alpha, no DoRA)")
    prefix = "base_model.model."
    state = {k.removeprefix(prefix): v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"]) if metadata["target_modules"] else None
    metadata["base_model_name_or_path"] = None  # a local path of the training machine
    if bake_alpha:
        scale = config.lora_alpha / config.r
        state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
        metadata["lora_alpha"] = config.r
    return state, metadata


def save_lora(pipeline: str, model: nn.Module, out: Path) -> Path:
    """Write the LoRA adapter of ``model`` with the pipeline class's ``save_lora_weights``."""
    cls = pipeline_class(pipeline)
    takes_metadata = "transformer_lora_adapter_metadata" in inspect.signature(cls.save_lora_weights).parameters
    state, metadata = lora_layers(model, bake_alpha=not takes_metadata)
    kwargs = {"transformer_lora_adapter_metadata": metadata} if takes_metadata else {}
    cls.save_lora_weights(str(out), transformer_lora_layers=state, weight_name=LORA_WEIGHTS,
                          safe_serialization=True, **kwargs)
    return out / LORA_WEIGHTS


def save_full(model: nn.Module, out: Path, max_shard_size: str | int = "5GB") -> Path:
    """Write the transformer as a diffusers model folder (config + safetensors shards)."""
    if hasattr(model, "peft_config"):
        raise ValueError("the transformer carries a LoRA adapter: export it with save_lora")
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    return out


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


def save_merged(model: nn.Module, out: Path) -> Path:
    """Write a transformer (its LoRA merged in, if it has one) to ``out`` as a diffusers model folder
    (``DiffusersBackbone.save_transformer``)."""
    from safetensors.torch import save_file

    from mixgrpo.core.checkpoint import share_like_open

    out.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "get_base_model"):
        model.save_pretrained(out, safe_serialization=True)
    else:
        model.get_base_model().save_config(out)
        save_file(merged_state_dict(model), str(out / "diffusion_pytorch_model.safetensors"))
    share_like_open(out)  # safetensors writes 0600; a shared model folder must be readable
    return out


def export(backbone: DiffusersBackbone, out: Path, max_shard_size: str | int = "5GB",
           load_path: str | None = None) -> dict[str, Any]:
    """``Backbone.export`` of a diffusers backbone: its LoRA adapter (``lora_rank > 0``) or its whole
    transformer, into ``out``; returns what was written and how to load it from ``load_path``."""
    pipeline, model = backbone.diffusers_pipeline, backbone.unwrapped()
    where = str(out if load_path is None else load_path)
    if backbone.lora_rank > 0:
        save_lora(pipeline, model, out)
        config = model.peft_config["default"]
        return {"kind": "lora", "pipeline": pipeline, "lora_rank": config.r, "lora_alpha": config.lora_alpha,
                "weights": LORA_WEIGHTS, "load": f"{pipeline}.from_pretrained(BASE).load_lora_weights({where!r})"}
    save_full(model, out, max_shard_size)
    name = type(model).__name__
    return {"kind": "full", "pipeline": pipeline, "model": name,
            "load": f"{name}.from_pretrained({where!r}) in place of BASE/transformer"}


def load_snippet(backbone: DiffusersBackbone, export_dir: str, prompt: str, num_steps: int) -> list[str]:
    """``Backbone.load_snippet`` of a diffusers backbone: its pipeline with the export loaded, or, for
    a model without a VAE (the shipped shapes-world model, which no pipeline draws), its transformer."""
    facts = backbone.model_facts()
    pipeline, model, rank = facts.pipeline, backbone.transformer_class, backbone.lora_rank
    base = facts.base_model or "BASE_MODEL"
    if backbone.vae is None:
        lines = [f"The base model (`{base}`) is a {model} on pixels without a VAE, so no diffusers pipeline "
                 "draws it; its transformer loads the export:", "", "```python", "import torch",
                 f"from diffusers import {model}", ""]
        if rank:
            lines += [f"transformer = {model}.from_pretrained(\"{base}\", subfolder=\"transformer\")",
                      f"transformer.load_lora_adapter(\"{export_dir}\", weight_name=\"{LORA_WEIGHTS}\", "
                      "prefix=\"transformer\")"]
        else:
            lines += [f"transformer = {model}.from_pretrained(\"{export_dir}\")"]
        return [*lines, "```"]
    call = (f"image = pipe(\"{prompt}\", height={facts.height}, width={facts.width}, num_inference_steps={num_steps}"
            + (f", guidance_scale={facts.guidance}" if facts.guidance is not None else "") + ").images[0]")
    lines = ["```python", "import torch"]
    if rank:
        lines += [f"from diffusers import {pipeline}", "",
                  f"pipe = {pipeline}.from_pretrained(\"{base}\", torch_dtype=torch.bfloat16)",
                  f"pipe.load_lora_weights(\"{export_dir}\")  # LoRA rank {rank}, alpha {facts.lora_alpha} "
                  "(stored in the file)"]
    else:
        lines += [f"from diffusers import {model}, {pipeline}", "",
                  f"transformer = {model}.from_pretrained(\"{export_dir}\", torch_dtype=torch.bfloat16)",
                  f"pipe = {pipeline}.from_pretrained(\"{base}\", transformer=transformer, torch_dtype=torch.bfloat16)"]
    return [*lines, call, "image.save(\"sample.png\")", "```"]
