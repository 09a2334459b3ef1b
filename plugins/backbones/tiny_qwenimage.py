"""A tiny Qwen-Image with random weights of the real diffusers/transformers classes, written as a
complete local snapshot (``QwenImagePipeline.save_pretrained``'s layout) that the ``qwenimage``
backbone and diffusers' ``QwenImagePipeline`` both load: the tests' stand-in for Qwen/Qwen-Image
(nothing is downloaded).

The tokenizer is word level, but it splits the chat template the way Qwen2's byte-level BPE does
where it matters: ``<|im_start|>`` and ``<|im_end|>`` are single special tokens and every newline is
a token, so the template's system prefix is exactly the 34 tokens the pipeline drops
(``prompt_template_encode_start_idx``), as with the real tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixgrpo.plugins.backbones.tiny import DEFAULT_VOCAB

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"  # Qwen2's special tokens
UNK = "<unk>"
# the words of QwenImagePipeline's prompt template (its system prompt and roles)
TEMPLATE_WORDS = ("system describe the image by detailing color shape size texture quantity text spatial "
                  "relationships of objects and background user assistant : ,").split()
#: the scheduler config Qwen/Qwen-Image ships (scheduler/scheduler_config.json): FLUX-style dynamic
#: shift, exponential, on 256..8192 image tokens, shift 0.5..0.9, the grid stretched to end at 0.02
QWENIMAGE_SCHEDULER = {
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
    "shift": 1.0, "shift_terminal": 0.02, "use_dynamic_shifting": True, "time_shift_type": "exponential",
    "num_train_timesteps": 1000,
}


def build_chat_tokenizer(vocab: Sequence[str], max_length: int = 1024) -> Any:
    """A lower-casing word-level ``PreTrainedTokenizerFast`` that keeps newlines as tokens, with
    Qwen2's ``<|im_start|>``/``<|im_end|>`` as special tokens, no BOS/EOS added, padding on the right
    with ``<|endoftext|>`` (id 0)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, UNK, IM_START, IM_END, "\n"]
    words = specials + [w for w in dict.fromkeys(w.lower() for w in vocab) if w not in specials]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # keep newlines, words and punctuation marks; drop the other white space
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, model_max_length=max_length,
                                   padding_side="right")
    fast.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    return fast


def tiny_qwen25vl(vocab_size: int, dim: int, layers: int = 1):
    """A ``Qwen2_5_VLForConditionalGeneration`` of width ``dim`` (2 heads, 1 KV head, multimodal RoPE
    sections summing to half the head width) with a one-block vision tower, as the pipeline loads."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = dim // 2 // 2  # half the head width: the rotary frequencies, split over (time, row, column)
    side = half * 3 // 8  # Qwen2.5-VL's proportions: 16, 24, 24 of 64
    sections = [half - 2 * side, side, side]
    text = {"vocab_size": vocab_size, "hidden_size": dim, "intermediate_size": 2 * dim, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
            "bos_token_id": 0, "eos_token_id": 3, "pad_token_id": 0}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 1, "out_hidden_size": dim,
              "fullatt_block_indexes": [0], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab_size - 1,
                              video_token_id=vocab_size - 1, vision_start_token_id=vocab_size - 1,
                              vision_end_token_id=vocab_size - 1)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_vae(z_dim: int = 4, base_dim: int = 8):
    """A tiny ``AutoencoderKLQwenImage`` (spatial downsampling 2, no temporal downsampling) with
    non-trivial per-channel latent means and stds, so that the (de)normalization is exercised."""
    from diffusers import AutoencoderKLQwenImage

    mean = [round(0.1 * (k - z_dim / 2), 3) for k in range(z_dim)]
    std = [round(0.5 + 0.25 * k, 3) for k in range(z_dim)]
    return AutoencoderKLQwenImage(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1,
                                  attn_scales=[], temperal_downsample=[False], latents_mean=mean, latents_std=std)


def build_tiny_qwenimage(path: str | os.PathLike, *, vocab: Sequence[str] | None = None, num_layers: int = 2,
                         attention_head_dim: int = 16, num_attention_heads: int = 2, text_dim: int = 32,
                         z_dim: int = 4, seed: int = 0) -> Path:
    """Write a complete, loadable Qwen-Image snapshot with random weights of the real classes.

    ``QwenImageTransformer2DModel`` (``num_layers`` dual-stream blocks, patch 2, RoPE axes summing to
    ``attention_head_dim``), a ``Qwen2_5_VLForConditionalGeneration`` text encoder of width
    ``text_dim`` (= ``joint_attention_dim``), the chat-template tokenizer of ``build_chat_tokenizer``
    over ``vocab`` (default: the shapes-world words) plus the template's words, a tiny
    ``AutoencoderKLQwenImage`` of ``z_dim`` latent channels (downsampling 2), and Qwen-Image's own
    scheduler config; ``model_index.json`` as ``QwenImagePipeline.save_pretrained`` writes it. No
    ``mixgrpo.json``: the image size is the backbone's to set. Returns ``path``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    if attention_head_dim % 4:
        raise ValueError(f"attention_head_dim must be a multiple of 4 (three even RoPE axes), got {attention_head_dim}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    words = [*(vocab if vocab is not None else DEFAULT_VOCAB), *TEMPLATE_WORDS]
    tokenizer = build_chat_tokenizer(words)
    first = attention_head_dim // 4 // 2 * 2 or 2
    rest = (attention_head_dim - first) // 4 * 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_qwen_vae(z_dim)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=num_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=text_dim, axes_dims_rope=(first, rest, attention_head_dim - first - rest))
        text_encoder = tiny_qwen25vl(len(tokenizer), text_dim)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(root)
    _name_tokenizer_class(root / "tokenizer")
    return root


def _name_tokenizer_class(folder: Path) -> None:
    """Record the tokenizer under the class every transformers version loads (a word-level fast
    tokenizer, not Qwen2's byte-level BPE)."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
