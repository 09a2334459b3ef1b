"""Real-size backbones with random weights, for timing: FLUX.1-dev, SD3.5-Medium and -Large,
Qwen-Image, FLUX.2-klein-4B and Z-Image.

A network's cost does not depend on its weights, so the benchmark builds the real architectures from
the configs in ``benchmarks/configs/`` (copied from the models' diffusers ``config.json`` files; no
download) and fills them with random weights. It goes through the project's own backbones
(``FluxBackbone``, ``SD3Backbone``, ``QwenImageBackbone``, ``Flux2Backbone``, ``ZImageBackbone``, each
selected by its gin file as in a real run):

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
ARCHS = {"flux-dev": "flux1-dev.json", "sd35-medium": "sd3.5-medium.json", "sd35-large": "sd3.5-large.json",
         "qwen-image": "qwen-image.json", "flux2-klein": "flux2-klein.json", "z-image": "z-image.json"}
# The sizes the RL recipes train at: MixGRPO/DanceGRPO on FLUX.1-dev at 720x720; FlowGRPO on SD3.5-M,
# SD3.5-L (experiments/flowgrpo_sd35_large.gin) and Qwen-Image at 512x512; Flow-Factory on Z-Image at
# 512x512 and on FLUX.2-klein-base at 384x384 (experiments/flowgrpo_zimage.gin, mixgrpo_flux2_klein.gin).
DEFAULT_SIZE = {"flux-dev": 720, "sd35-medium": 512, "sd35-large": 512, "qwen-image": 512, "flux2-klein": 384,
                "z-image": 512}

# Dry-run sizes: the same classes and code path, every width and depth shrunk.
_TINY_VAE = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}
_TINY_SD3 = {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 64,
             "caption_projection_dim": 16, "pooled_projection_dim": 48, "pos_embed_max_size": 16, "sample_size": 8}
_TINY_SD3_TEXT = {"clip_hidden_sizes": [16, 32], "clip_max_length": 16, "max_sequence_length": 8}
_TINY_QWEN3 = {"qwen3_num_attention_heads": 2, "qwen3_num_key_value_heads": 1, "qwen3_head_dim": 8}
TINY = {
    "flux-dev": {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]},
        "vae": _TINY_VAE,
        "text": {"clip_hidden_size": 32, "clip_max_length": 16, "t5_d_model": 32, "t5_tokenizer_max_length": 16,
                 "max_sequence_length": 16},
    },
    "sd35-medium": {"transformer": {**_TINY_SD3, "dual_attention_layers": [0]}, "vae": _TINY_VAE,
                    "text": _TINY_SD3_TEXT},
    "sd35-large": {"transformer": {**_TINY_SD3, "dual_attention_layers": []}, "vae": _TINY_VAE,
                   "text": _TINY_SD3_TEXT},
    "qwen-image": {  # 3 VAE scales (temperal_downsample keeps its 3 entries): 8x down, as the real one
        "transformer": {"num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                        "axes_dims_rope": [4, 6, 6]},
        "vae": {"base_dim": 8, "dim_mult": [1, 2, 2, 2]},
        "text": {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
                 "max_sequence_length": 16},
    },
    "flux2-klein": {  # 3 stacked Qwen3 states of 16 = joint_attention_dim 48
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 48, "timestep_guidance_channels": 32, "axes_dims_rope": [4, 4, 4, 4]},
        "vae": _TINY_VAE,
        "text": {"qwen3_hidden_size": 16, **_TINY_QWEN3, "max_sequence_length": 64},
    },
    "z-image": {
        "transformer": {"dim": 32, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2,
                        "cap_feat_dim": 32, "axes_dims": [4, 6, 6], "axes_lens": [64, 16, 16]},
        "vae": _TINY_VAE,
        "text": {"qwen3_hidden_size": 32, **_TINY_QWEN3, "qwen3_head_dim": 16, "qwen3_intermediate_size": 64,
                 "max_sequence_length": 16},
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
    writer = _TEXT_WRITERS.get(arch["backbone"])
    if writer is None:  # before anything is written
        raise ValueError(f"unknown backbone kind {arch['backbone']!r} in the architecture config; "
                         f"known: {', '.join(sorted(_TEXT_WRITERS))}")
    root = Path(root)
    _write_config(root / "transformer", _public(arch["transformer"]))
    _write_config(root / "vae", _public(arch["vae"]))
    writer(arch["text"], root)
    return root


# The text side: one-layer stand-ins of each family's encoders with the real output widths, and the
# tokenizers the backbones read (the text is encoded once per prompt per iteration, so only the
# widths and the sequence lengths reach the step cost).

def _write_flux_text(text: dict[str, Any], root: Path) -> None:
    """CLIP-L (pooled width) and one layer of T5-XXL's shape, each with its tokenizer."""
    from transformers import T5Config

    from mixgrpo.plugins.backbones.tiny import DEFAULT_VOCAB, build_word_tokenizer, save_tokenizer, tiny_clip_config

    tokenizer = build_word_tokenizer(DEFAULT_VOCAB, text["clip_max_length"])
    vocab = len(tokenizer)
    tiny_clip_config(vocab, text["clip_hidden_size"], 1, text["clip_max_length"]).save_pretrained(
        root / "text_encoder")
    save_tokenizer(tokenizer, root / "tokenizer")
    d_model = text["t5_d_model"]
    heads = max(1, d_model // 64)
    # one layer of T5-XXL's shape (d_kv 64, gated-GELU feed-forward 2.5x wide)
    T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_model * 5 // 2, num_layers=1,
             num_heads=heads, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
             pad_token_id=0, eos_token_id=3, decoder_start_token_id=0).save_pretrained(root / "text_encoder_2")
    save_tokenizer(build_word_tokenizer(DEFAULT_VOCAB, text["t5_tokenizer_max_length"], bos=False),
                   root / "tokenizer_2")


def _write_sd3_text(text: dict[str, Any], root: Path) -> None:
    """CLIP-L and CLIP-bigG (their widths); no T5: the backbone feeds zero tokens in its place."""
    from mixgrpo.plugins.backbones.tiny import DEFAULT_VOCAB, build_word_tokenizer, save_tokenizer, tiny_clip_config

    tokenizer = build_word_tokenizer(DEFAULT_VOCAB, text["clip_max_length"])
    for suffix, dim in zip(("", "_2"), text["clip_hidden_sizes"], strict=True):
        tiny_clip_config(len(tokenizer), dim, 1, text["clip_max_length"], projection_dim=dim).save_pretrained(
            root / f"text_encoder{suffix}")
        save_tokenizer(tokenizer, root / f"tokenizer{suffix}")


def _qwen3_config(text: dict[str, Any], vocab: int, **extra: Any) -> Any:
    """One Qwen3 layer of the config's width, heads and head size (the families' Qwen3-4B)."""
    from transformers import Qwen3Config

    hidden = text["qwen3_hidden_size"]
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1,
                       intermediate_size=text.get("qwen3_intermediate_size", 3 * hidden),
                       num_attention_heads=text["qwen3_num_attention_heads"],
                       num_key_value_heads=text["qwen3_num_key_value_heads"], head_dim=text["qwen3_head_dim"],
                       max_position_embeddings=4096, **extra)


def _write_zimage_text(text: dict[str, Any], root: Path) -> None:
    """A one-layer Qwen3 (its penultimate hidden state is then the embeddings') and the chat tokenizer."""
    from mixgrpo.plugins.backbones.tiny import DEFAULT_VOCAB, save_tokenizer
    from mixgrpo.plugins.backbones.tiny_zimage import build_chat_tokenizer

    tokenizer = build_chat_tokenizer(DEFAULT_VOCAB, text["max_sequence_length"])
    _qwen3_config(text, len(tokenizer), pad_token_id=0, tie_word_embeddings=False).save_pretrained(
        root / "text_encoder")
    save_tokenizer(tokenizer, root / "tokenizer")


def _write_flux2_text(text: dict[str, Any], root: Path) -> None:
    """A one-layer Qwen3ForCausalLM (the backbone stacks its hidden state ``text_encoder_out_layers``
    times) and the byte-level Qwen tokenizer with its chat template."""
    from mixgrpo.plugins.backbones.tiny_flux2 import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer(text["max_sequence_length"])
    vocab = len(tokenizer)  # the specials close the vocabulary, as in tiny_flux2.tiny_qwen3
    _qwen3_config(text, vocab, tie_word_embeddings=True, bos_token_id=None, eos_token_id=vocab - 3,
                  pad_token_id=vocab - 5).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")


def _write_qwenimage_text(text: dict[str, Any], root: Path) -> None:
    """One decoder layer of Qwen2.5-VL-7B's shape (with a one-block vision tower, which encoding
    never runs) and the chat tokenizer whose template prefix is the pipeline's 34 tokens."""
    from transformers import Qwen2_5_VLConfig

    from mixgrpo.plugins.backbones.tiny import DEFAULT_VOCAB, save_tokenizer
    from mixgrpo.plugins.backbones.tiny_qwenimage import TEMPLATE_WORDS, build_chat_tokenizer

    tokenizer = build_chat_tokenizer([*DEFAULT_VOCAB, *TEMPLATE_WORDS])
    vocab, dim, heads = len(tokenizer), text["hidden_size"], text["num_attention_heads"]
    half = dim // heads // 2  # half a head: the rotary frequencies, split over (time, row, column)
    side = half * 3 // 8  # Qwen2.5-VL's proportions: 16, 24, 24 of 64
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": vocab, "hidden_size": dim, "intermediate_size": text["intermediate_size"],
                     "num_hidden_layers": 1, "num_attention_heads": heads,
                     "num_key_value_heads": text["num_key_value_heads"], "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [half - 2 * side, side, side]},
                     "bos_token_id": 0, "eos_token_id": 3, "pad_token_id": 0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 1,
                       "out_hidden_size": dim, "fullatt_block_indexes": [0]},
        image_token_id=vocab - 1, video_token_id=vocab - 1, vision_start_token_id=vocab - 1,
        vision_end_token_id=vocab - 1)
    config.save_pretrained(root / "text_encoder")
    save_tokenizer(tokenizer, root / "tokenizer")


_TEXT_WRITERS = {"flux": _write_flux_text, "sd3": _write_sd3_text, "zimage": _write_zimage_text,
                 "flux2": _write_flux2_text, "qwenimage": _write_qwenimage_text}


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

    # the transformers, VAEs and text encoders that the backbones' _load_components build
    return [diffusers.FluxTransformer2DModel, diffusers.SD3Transformer2DModel, diffusers.ZImageTransformer2DModel,
            diffusers.QwenImageTransformer2DModel, diffusers.Flux2Transformer2DModel, diffusers.AutoencoderKL,
            diffusers.AutoencoderKLQwenImage, diffusers.AutoencoderKLFlux2, transformers.CLIPTextModel,
            transformers.CLIPTextModelWithProjection, transformers.T5EncoderModel, transformers.Qwen3Model,
            transformers.Qwen3ForCausalLM, transformers.Qwen2_5_VLForConditionalGeneration]


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
