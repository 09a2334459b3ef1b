"""Tiny Z-Image and SD3.5-Large snapshots with random weights of the real diffusers/transformers
classes, written as complete local folders that ``ZImagePipeline`` / ``StableDiffusion3Pipeline``
and the ``zimage`` / ``sd3`` backbones load like the real ones (nothing is downloaded).

The Z-Image snapshot holds every component ``ZImagePipeline`` loads: ``transformer/``
(``ZImageTransformer2DModel``), ``text_encoder/`` (a ``Qwen3Model``), ``tokenizer/`` (a word-level
tokenizer with a Qwen3-style chat template), ``vae/`` (``AutoencoderKL``), ``scheduler/``
(``FlowMatchEulerDiscreteScheduler``, static shift) and ``model_index.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixgrpo.plugins.backbones.diffusers_base import DEFAULTS_FILE
from mixgrpo.plugins.backbones.tiny import DEFAULT_VOCAB, build_tiny_sd3, save_tokenizer, tiny_vae

#: Qwen's control tokens (ids 0..3): the pad token, an unknown-word token, and the chat markers
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "[UNK]", "<|im_start|>", "<|im_end|>")
#: the words of the chat template itself
CHAT_WORDS = ("system", "user", "assistant", "think")
#: Qwen3's chat layout for one user turn, written for this tokenizer: ``<|im_start|>user\n…<|im_end|>\n``,
#: then ``<|im_start|>assistant\n`` for the generation prompt, and the empty thinking block only when
#: ``enable_thinking=False`` (ZImagePipeline passes ``enable_thinking=True``: no block)
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def build_chat_tokenizer(vocab: Sequence[str], max_length: int) -> Any:
    """A lower-casing word-level ``PreTrainedTokenizerFast`` with Qwen's special tokens and a chat template.

    Like Qwen's tokenizer it adds no BOS/EOS of its own (the chat template writes the markers),
    pads on the right with ``<|endoftext|>`` (id 0), and maps unknown words to ``[UNK]`` (id 1).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(CHAT_SPECIAL_TOKENS) + [w for w in dict.fromkeys(w.lower() for w in (*CHAT_WORDS, *vocab))
                                         if w not in CHAT_SPECIAL_TOKENS]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="[UNK]", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=max_length,
        padding_side="right", chat_template=QWEN3_STYLE_TEMPLATE)


def tiny_qwen3(vocab_size: int, dim: int, layers: int, max_length: int):
    """A small ``Qwen3Model`` (the class ZImagePipeline's text encoder is) of width ``dim``."""
    from transformers import Qwen3Config, Qwen3Model

    heads = max(1, dim // 16)
    return Qwen3Model(Qwen3Config(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                                  head_dim=dim // heads, max_position_embeddings=max_length, pad_token_id=0,
                                  tie_word_embeddings=False))


def tiny_zimage_transformer(in_channels: int, text_dim: int, dim: int, heads: int, layers: int,
                            refiner_layers: int, axes_lens: tuple[int, int, int]):
    """A ``ZImageTransformer2DModel`` (patch 2, one frame) of width ``dim``; RoPE axes (frame/caption
    position, row, column) split the head as Z-Image's 32/48/48 of 128 does."""
    from diffusers import ZImageTransformer2DModel

    head_dim = dim // heads
    if head_dim % 8:
        raise ValueError(f"dim / heads must be a multiple of 8 (three even RoPE axes), got {head_dim}")
    first = head_dim // 4 // 2 * 2
    rest = (head_dim - first) // 2
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=in_channels, dim=dim, n_layers=layers,
        n_refiner_layers=refiner_layers, n_heads=heads, n_kv_heads=heads, cap_feat_dim=text_dim,
        axes_dims=[first, rest, head_dim - first - rest], axes_lens=list(axes_lens))


def build_tiny_zimage(path: str | os.PathLike, *, vocab: Sequence[str] | None = None, image_size: int = 32,
                      dim: int = 32, heads: int = 2, num_layers: int = 2, refiner_layers: int = 1,
                      text_dim: int = 32, text_layers: int = 2, max_text_length: int = 64, shift: float = 3.0,
                      seed: int = 0, defaults: bool = True) -> Path:
    """Write a complete ``ZImagePipeline`` snapshot with random weights of the real classes.

    ``ZImageTransformer2DModel`` (``num_layers`` main and ``refiner_layers`` noise/context refiner
    blocks of width ``dim``, 4 latent channels), a ``Qwen3Model`` text encoder of width ``text_dim``
    (= the transformer's ``cap_feat_dim``) with ``text_layers`` layers, a word-level tokenizer over
    ``vocab`` (default: the shapes-world words) carrying a Qwen3-style chat template, a tiny
    ``AutoencoderKL`` (downsampling 2, scale 0.5, shift 0.1) and the scheduler as Z-Image ships it
    (flow matching, static ``shift``: 3.0 for Z-Image-Turbo, 6.0 for Z-Image). Written by
    ``ZImagePipeline.save_pretrained`` (``model_index.json`` included); ``defaults`` adds
    ``mixgrpo.json`` with ``image_size`` (without it the backbone's fallback, 1024, applies).
    Returns ``path``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_chat_tokenizer(list(vocab) if vocab is not None else list(DEFAULT_VOCAB), max_text_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae()
        latent = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
        transformer = tiny_zimage_transformer(
            vae.config.latent_channels, text_dim, dim, heads, num_layers, refiner_layers,
            axes_lens=(2 * max_text_length, max(16, latent), max(16, latent)))
        encoder = tiny_qwen3(len(tokenizer), text_dim, text_layers, 2 * max_text_length)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(root)
    save_tokenizer(tokenizer, root / "tokenizer")  # under the class name every transformers version knows
    if defaults:
        (root / DEFAULTS_FILE).write_text(json.dumps({"height": image_size, "width": image_size}) + "\n")
    return root


def build_tiny_sd35_large(path: str | os.PathLike, *, num_layers: int = 2, attention_head_dim: int = 16,
                          num_attention_heads: int = 3, seed: int = 0, snapshot: bool = True,
                          **options: Any) -> Path:
    """A tiny snapshot shaped like Stable Diffusion 3.5 Large: ``SD3Transformer2DModel`` without
    dual-attention (MMDiT) blocks, RMS q/k norm, as many heads as layers would be at full size
    (38 × 64-dim heads, caption projection = heads × head dim), written as
    ``StableDiffusion3Pipeline.save_pretrained`` writes it (``snapshot``). The other arguments are
    ``build_tiny_sd3``'s (image size, CLIP and T5 widths, vocabulary, ...). Returns ``path``."""
    return build_tiny_sd3(path, num_layers=num_layers, attention_head_dim=attention_head_dim,
                          num_attention_heads=num_attention_heads, dual_attention_layers=(), seed=seed,
                          snapshot=snapshot, **options)
