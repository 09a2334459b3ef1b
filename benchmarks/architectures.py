"""Real-size backbones with random weights, for timing: FLUX.1-dev and SD3.5-Medium.

A network's cost does not depend on its weights, so the benchmark builds the real architectures from
the configs in ``benchmarks/configs/`` (copied from the models' diffusers ``config.json`` files; no
download) and fills them with random weights. It goes through the project's own backbones
(``FluxBackbone`` / ``SD3Backbone``, selected by gin as in a real run):

1. ``write_model_dir`` writes a diffusers-format folder holding only configs and tokenizers: the
   transformer's and the VAE's real ``config.json``, and small stand-in text encoders (the text side
   is encoded once per prompt per iteration and cached across steps; only its output widths and
   sequence length reach the transformer, and those are kept).
2. ``random_weights`` makes ``from_pretrained`` of those components, for paths inside that folder
   only, build the model from its config directly on the target device in the target dtype (a 12B
   FLUX is never initialised on the CPU). Everything after loading (LoRA, devices, latent layout,
   CFG) is the backbone's own code.

``tiny=True`` shrinks every width and depth (same classes, same code path) for the CPU dry run.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"
ARCHS = {"flux-dev": "flux1-dev.json", "sd35-medium": "sd3.5-medium.json"}
# The sizes the papers train at: MixGRPO/DanceGRPO on FLUX.1-dev at 720x720, FlowGRPO on SD3.5-M at 512x512.
DEFAULT_SIZE = {"flux-dev": 720, "sd35-medium": 512}

# Dry-run sizes: the same classes and code path, every width and depth shrunk.
_TINY_VAE = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}
TINY = {
    "flux-dev": {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]},
        "vae": _TINY_VAE,
        "text": {"clip_hidden_size": 32, "clip_max_length": 16, "t5_d_model": 32, "t5_tokenizer_max_length": 16,
                 "max_sequence_length": 16},
    },
    "sd35-medium": {
        "transformer": {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 64,
                        "caption_projection_dim": 16, "pooled_projection_dim": 48, "pos_embed_max_size": 16,
                        "sample_size": 8, "dual_attention_layers": [0]},
        "vae": _TINY_VAE,
        "text": {"clip_hidden_sizes": [16, 32], "clip_max_length": 16, "max_sequence_length": 8},
    },
}
TINY_SIZE = 32


def load_arch(name: str, tiny: bool = False) -> dict[str, Any]:
    """The architecture config ``name`` (a key of ``ARCHS``), shrunk when ``tiny``."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))}")
    arch = json.loads((CONFIGS / ARCHS[name]).read_text())
    if tiny:
        arch = copy.deepcopy(arch)
        for part, overrides in TINY[name].items():
            arch[part].update(overrides)
    return arch


def _public(config: dict[str, Any]) -> dict[str, Any]:
    """Config keys without the ``_``-prefixed notes (``_source``, ``_class_name``, ``_note``)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def count_parameters(arch: dict[str, Any]) -> int:
    """Parameters of the architecture's transformer (built on the meta device: no memory, no time)."""
    cls = _transformer_class(arch)
    with torch.device("meta"):
        model = cls.from_config(_public(arch["transformer"]))
    return sum(p.numel() for p in model.parameters())


def _transformer_class(arch: dict[str, Any]) -> type:
    import diffusers

    return getattr(diffusers, arch["transformer"]["_class_name"])


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_model_dir(arch: dict[str, Any], root: str | Path) -> Path:
    """A diffusers-format folder for ``arch`` with configs and tokenizers but no weights.

    Load it with the backbone inside ``random_weights(root, ...)``; outside that context the
    backbone fails as on any folder without weights.
    """
    from transformers import CLIPTextConfig, T5Config

    from mixgrpo.plugins.backbones.tiny import DEFAULT_VOCAB, build_word_tokenizer, save_tokenizer, tiny_clip_config

    root = Path(root)
    text = arch["text"]
    tokenizer = build_word_tokenizer(DEFAULT_VOCAB, text["clip_max_length"])
    vocab = len(tokenizer)
    _write_config(root / "transformer", _public(arch["transformer"]))
    _write_config(root / "vae", _public(arch["vae"]))
    if arch["backbone"] == "flux":
        clip: CLIPTextConfig = tiny_clip_config(vocab, text["clip_hidden_size"], 1, text["clip_max_length"])
        clip.save_pretrained(root / "text_encoder")
        save_tokenizer(tokenizer, root / "tokenizer")
        d_model = text["t5_d_model"]
        heads = max(1, d_model // 64)
        # one layer of T5-XXL's shape (d_kv 64, gated-GELU feed-forward 2.5x wide)
        T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_model * 5 // 2, num_layers=1,
                 num_heads=heads, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                 pad_token_id=0, eos_token_id=3, decoder_start_token_id=0).save_pretrained(root / "text_encoder_2")
        save_tokenizer(build_word_tokenizer(DEFAULT_VOCAB, text["t5_tokenizer_max_length"], bos=False),
                       root / "tokenizer_2")
    elif arch["backbone"] == "sd3":
        for suffix, dim in zip(("", "_2"), text["clip_hidden_sizes"], strict=True):
            tiny_clip_config(vocab, dim, 1, text["clip_max_length"], projection_dim=dim).save_pretrained(
                root / f"text_encoder{suffix}")
            save_tokenizer(tokenizer, root / f"tokenizer{suffix}")
    else:
        raise ValueError(f"unknown backbone kind {arch['backbone']!r} in the architecture config")
    return root


@contextlib.contextmanager
def _materialize(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New tensors are created on ``device`` in ``dtype`` (parameters initialised there)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _inside(path: Any, root: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(root)
    except (TypeError, ValueError, OSError):
        return False


def _random_classes() -> list[type]:
    import diffusers
    import transformers

    return [diffusers.FluxTransformer2DModel, diffusers.SD3Transformer2DModel, diffusers.AutoencoderKL,
            transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection, transformers.T5EncoderModel]


@contextlib.contextmanager
def random_weights(root: str | Path, device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Within the context, ``from_pretrained`` of the diffusers/transformers classes the backbones load
    builds a randomly initialised model from the folder's ``config.json`` on ``device`` in ``dtype``,
    for folders inside ``root``; any other path loads as usual."""
    root = Path(root).resolve()
    device = torch.device(device)
    saved: dict[type, Any] = {}

    def patch(cls: type) -> None:
        original = cls.from_pretrained  # bound to cls

        def from_pretrained(klass, path, *args, **kwargs):
            if klass is not cls or not _inside(path, root):
                return original(path, *args, **kwargs)
            want = kwargs.get("dtype") or kwargs.get("torch_dtype") or dtype
            with _materialize(device, want):
                model = _build(cls, Path(path))
            return model.eval()  # built on ``device`` in ``want`` already

        saved[cls] = cls.__dict__.get("from_pretrained")
        cls.from_pretrained = classmethod(from_pretrained)

    for cls in _random_classes():
        patch(cls)
    try:
        yield
    finally:
        for cls, descriptor in saved.items():
            if descriptor is None:
                delattr(cls, "from_pretrained")
            else:
                cls.from_pretrained = descriptor


def _build(cls: type, folder: Path) -> torch.nn.Module:
    """``cls`` from ``folder/config.json`` with its default initialisation."""
    import transformers

    if issubclass(cls, transformers.PreTrainedModel):
        return cls(cls.config_class.from_pretrained(folder))
    config = json.loads((folder / "config.json").read_text())
    return cls.from_config(_public(config))
