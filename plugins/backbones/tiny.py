"""Tiny FLUX and SD3.5 models with random weights of the real diffusers/transformers classes, written
as complete local snapshots that the ``flux`` and ``sd3`` backbones load like the real ones: the tests'
stand-ins for FLUX.1-dev and SD3.5 (nothing is downloaded), and the shapes world's architecture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixgrpo.plugins.backbones.diffusers_base import DEFAULTS_FILE

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3

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
                    max_text_length: int = 32, snapshot: bool = False) -> Path:
    """Write a complete, loadable FLUX directory with random weights of the real classes.

    The transformer is a ``FluxTransformer2DModel`` with ``num_layers`` double and
    ``num_single_layers`` single blocks (``guidance_embeds=False``); the text encoder a
    ``CLIPTextModel`` of width ``text_dim`` with a word-level tokenizer over ``vocab`` (default:
    ``DEFAULT_VOCAB``, the shapes-world words) and a context of ``max_text_length`` tokens.
    Without a VAE the model works on ``image_size``² RGB pixels packed in ``patch``² patches
    (``in_channels = 3·patch²``); ``with_vae`` adds a tiny ``AutoencoderKL`` (4 latent channels,
    downsampling 2, packed 2×2; ``patch`` is then unused); ``with_t5`` adds a tiny
    ``T5EncoderModel`` of width ``t5_dim`` (default ``text_dim``) as the sequence encoder.
    ``snapshot`` writes the folder as FLUX.1-dev's snapshot is (``FluxPipeline.save_pretrained``:
    ``model_index.json``, ``scheduler/``, both text encoders and the VAE, no ``mixgrpo.json``, so the
    image size is the backbone's to set); it implies ``with_vae`` and ``with_t5``.

    Returns:
        ``path`` (created), loadable with ``FluxBackbone(path)``.
    """
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with_vae, with_t5 = with_vae or snapshot, with_t5 or snapshot
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
    if snapshot:
        _save_pipeline(root, "FluxPipeline")
        return root
    (root / DEFAULTS_FILE).write_text(json.dumps({"height": image_size, "width": image_size}, indent=2) + "\n")
    return root


def _save_pipeline(root: Path, pipeline: str) -> None:
    """Rewrite the component folders in ``root`` as diffusers' ``<pipeline>.save_pretrained`` writes a
    model snapshot: ``model_index.json`` and a ``scheduler/`` (flow matching, shift 3) beside them."""
    import diffusers
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    cls = getattr(diffusers, pipeline)
    names = [n for n in cls._get_signature_keys(cls)[0] if n != "scheduler"]
    components = {n: None for n in cls._optional_components}
    for name in names:
        folder = root / name
        if name.startswith("tokenizer") and folder.is_dir():
            components[name] = AutoTokenizer.from_pretrained(folder)
        elif folder.is_dir():
            config = json.loads((folder / "config.json").read_text())
            if name in ("transformer", "vae"):
                components[name] = getattr(diffusers, config["_class_name"]).from_pretrained(folder)
            else:
                components[name] = getattr(transformers, config["architectures"][0]).from_pretrained(folder)
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **components)
    pipe.save_pretrained(root)
    for name in names:  # the word-level tokenizers under the class name every transformers version knows
        if name.startswith("tokenizer") and (root / name).is_dir():
            save_tokenizer(components[name], root / name)


def build_tiny_sd3(path: str | os.PathLike, *, vocab: Sequence[str] | None = None, image_size: int = 32,
                   num_layers: int = 2, attention_head_dim: int = 16, num_attention_heads: int = 2,
                   clip_dims: tuple[int, int] = (32, 48), t5_dim: int = 96, with_t5: bool = True,
                   dual_attention_layers: tuple[int, ...] = (0,), max_text_length: int = 16,
                   seed: int = 0, snapshot: bool = False) -> Path:
    """Write a complete, loadable SD3.5-style directory with random weights of the real classes.

    ``SD3Transformer2DModel`` (``num_layers`` joint blocks, RMS q/k norm, dual attention in
    ``dual_attention_layers`` as SD3.5-medium, patch 2), two ``CLIPTextModelWithProjection`` of widths
    ``clip_dims`` (projection = width), an optional ``T5EncoderModel`` of width ``t5_dim``
    (= ``joint_attention_dim``), word-level tokenizers over ``vocab`` (default: the shapes-world
    words), and a tiny ``AutoencoderKL`` (4 latent channels, downsampling 2). ``snapshot`` writes the
    folder as SD3.5's snapshot is (``StableDiffusion3Pipeline.save_pretrained``: ``model_index.json``,
    ``scheduler/``, no ``mixgrpo.json``); it implies ``with_t5``. Returns ``path``.
    """
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    with_t5 = with_t5 or snapshot
    if sum(clip_dims) > t5_dim:
        raise ValueError(f"t5_dim={t5_dim} must hold both CLIP widths {clip_dims}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    words = list(vocab) if vocab is not None else list(DEFAULT_VOCAB)
    tokenizer = build_word_tokenizer(words, max_text_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae()
        vae.save_pretrained(root / "vae")
        latent = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
        SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=vae.config.latent_channels, num_layers=num_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=t5_dim, caption_projection_dim=attention_head_dim * num_attention_heads,
            pooled_projection_dim=sum(clip_dims), out_channels=vae.config.latent_channels,
            pos_embed_max_size=latent, dual_attention_layers=tuple(dual_attention_layers), qk_norm="rms_norm",
        ).save_pretrained(root / "transformer")
        for suffix, dim in zip(("", "_2"), clip_dims, strict=True):
            config = tiny_clip_config(len(tokenizer), dim, 1, max_text_length, projection_dim=dim)
            CLIPTextModelWithProjection(config).save_pretrained(root / f"text_encoder{suffix}")
            save_tokenizer(tokenizer, root / f"tokenizer{suffix}")
        if with_t5:
            tiny_t5(len(tokenizer), t5_dim).save_pretrained(root / "text_encoder_3")
            save_tokenizer(build_word_tokenizer(words, 512, bos=False), root / "tokenizer_3")
    if snapshot:
        _save_pipeline(root, "StableDiffusion3Pipeline")
        return root
    (root / DEFAULTS_FILE).write_text(f'{{"height": {image_size}, "width": {image_size}}}\n')
    return root
