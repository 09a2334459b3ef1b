"""A tiny FLUX.2-klein snapshot with random weights of the real classes, written as
``Flux2KleinPipeline.save_pretrained`` writes the published ones, so that both the ``flux2`` backbone
and diffusers' own pipeline load it: the tests' stand-in for FLUX.2-klein (nothing is downloaded).

Every component the pipeline loads is there: ``Flux2Transformer2DModel``, ``AutoencoderKLFlux2``
(with non-trivial batch-norm latent statistics), ``Qwen3ForCausalLM`` with a byte-level
``Qwen2Tokenizer`` carrying a chat template, the flow-matching scheduler with FLUX.2's dynamic
(exponential) shifting, and ``model_index.json`` (with ``is_distilled``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mixgrpo.plugins.backbones.diffusers_base import DEFAULTS_FILE

#: the special tokens of Qwen3's tokenizer that its chat template writes (ids follow the 256 bytes)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Qwen3's chat template, reduced to what Flux2KleinPipeline asks of it (user turns, a generation
# prompt, and the empty thinking block that ``enable_thinking=False`` writes); written for this
# tiny tokenizer, it renders those requests to the same text as Qwen3's own template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)

#: FLUX.2's scheduler settings (dynamic exponential shifting: the pipeline passes its own ``mu``)
FLUX2_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                   "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                   "time_shift_type": "exponential"}


def build_qwen_tokenizer(max_length: int = 512) -> Any:
    """A byte-level ``Qwen2Tokenizer`` (one token per UTF-8 byte, no merges) with Qwen3's special
    tokens and a chat template; pads on the right with ``<|endoftext|>`` as Qwen3's does."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols, in a fixed order
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({token: len(alphabet) + i for i, token in enumerate(QWEN_SPECIALS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3(vocab_size: int, dim: int, layers: int, max_length: int) -> Any:
    """A small ``Qwen3ForCausalLM`` (grouped-query attention with 2 query heads per KV head, tied
    embeddings as Qwen3-4B) of width ``dim`` and depth ``layers``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(2, dim // 8)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=dim // heads,
                         max_position_embeddings=max(max_length, 128), tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=vocab_size - 3, pad_token_id=vocab_size - 5)
    return Qwen3ForCausalLM(config)


def tiny_flux2_vae(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (8, 16)) -> Any:
    """A tiny ``AutoencoderKLFlux2`` whose batch-norm statistics (over the 2×2-patchified latents)
    are not the identity, so a decode that skipped or misplaced them would show."""
    from diffusers import AutoencoderKLFlux2

    n = len(block_out_channels)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=block_out_channels, layers_per_block=1,
                             latent_channels=latent_channels, norm_num_groups=4, sample_size=32)
    stats = torch.Generator().manual_seed(17)
    vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.num_features, generator=stats))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features, generator=stats))
    return vae


def build_tiny_flux2(path: str | os.PathLike, *, image_size: int = 32, num_layers: int = 1,
                     num_single_layers: int = 2, attention_head_dim: int = 16, num_attention_heads: int = 2,
                     text_dim: int = 16, text_layers: int = 28, max_text_length: int = 512,
                     distilled: bool = False, seed: int = 0) -> Path:
    """Write a complete FLUX.2-klein snapshot with random weights of the real classes.

    The transformer has ``num_layers`` double- and ``num_single_layers`` single-stream blocks and
    reads the Qwen3 hidden states of layers 9, 18 and 27 side by side (``joint_attention_dim =
    3·text_dim``), so the text encoder needs ``text_layers >= 27`` for the pipeline's default
    layers; the VAE has 4 latent channels and downsamples by 2, so the transformer sees
    ``16`` channels (2×2 patches) at ``image_size / 4`` per side. ``distilled`` writes
    ``is_distilled = true`` into ``model_index.json`` (FLUX.2-klein-4B; the base model has false).
    A ``mixgrpo.json`` gives ``image_size`` as the default size (a published snapshot has none).

    Returns:
        ``path`` (created), loadable with ``Flux2Backbone(path)`` and ``Flux2KleinPipeline.from_pretrained``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    if attention_head_dim % 8:
        raise ValueError(f"attention_head_dim must be a multiple of 8 (four even rotary axes), "
                         f"got {attention_head_dim}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer(max_text_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_flux2_vae()
        text_encoder = tiny_qwen3(len(tokenizer), text_dim, text_layers, max_text_length)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=3 * text_dim, timestep_guidance_channels=32,
            axes_dims_rope=(attention_head_dim // 4,) * 4, guidance_embeds=False)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=distilled)
    pipe.save_pretrained(root)
    (root / DEFAULTS_FILE).write_text(json.dumps({"height": image_size, "width": image_size}, indent=2) + "\n")
    return root
