"""A toy backbone: a few-thousand-parameter conv net standing in for a real model in tests.

It is a real ``TorchBackbone`` (prompts → conditioning → velocity → images) so that every
objective × sampler × schedule combination trains on a CPU in seconds. Words are hashed into a
small embedding table, so any prompt is accepted.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import nn

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import ModelFacts, TorchBackbone
from mixgrpo.core.types import Conditioning


class _ToyNet(nn.Module):
    def __init__(self, channels: int, hidden: int, embed_dim: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed_dim)
        self.cond = nn.Linear(embed_dim + 1, hidden)
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = self.embed(tokens) * mask[..., None]
        text = emb.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        c = self.cond(torch.cat([text, sigma[:, None]], dim=1))[:, :, None, None]
        h = torch.nn.functional.silu(self.inp(x) + c)
        h = torch.nn.functional.silu(self.mid(h) + h)
        return self.out(h)


class ToyBackbone(TorchBackbone):
    """Conv-net backbone on ``[channels, size, size]`` latents.

    Args:
        channels: latent channels (the first 3 are decoded as RGB).
        size: latent height and width.
        hidden: conv width.
        embed_dim: text embedding width.
        vocab: hash buckets for words.
        seed: initialisation seed.
    """

    def __init__(self, channels: int = 4, size: int = 8, hidden: int = 16, embed_dim: int = 8,
                 vocab: int = 64, seed: int = 0) -> None:
        if channels < 3:
            raise ValueError(f"ToyBackbone needs channels >= 3 to decode RGB, got {channels}")
        self.channels, self.size, self.vocab = channels, size, vocab
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = _ToyNet(channels, hidden, embed_dim, vocab)

    def _token_ids(self, prompt: str) -> list[int]:
        words = prompt.lower().split() or [""]
        return [zlib.crc32(w.encode()) % self.vocab for w in words]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        ids = [self._token_ids(p) for p in prompts]
        width = max(len(i) for i in ids)
        tokens = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.bool)
        for n, row in enumerate(ids):
            tokens[n, : len(row)] = torch.tensor(row)
            mask[n, : len(row)] = True
        return Conditioning(embeds=tokens.to(self.device), mask=mask.to(self.device))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.module(x.float(), sigma.float().reshape(-1), cond.embeds, cond.mask).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents[:, :3].float() + 1) / 2).clamp(0, 1)

    def latent_shape(self) -> tuple[int, ...]:
        return (self.channels, self.size, self.size)

    def model_facts(self) -> ModelFacts:
        """No diffusers pipeline draws the toy net: ``mixgrpo export`` refuses it, and its model card
        tells how to draw with ``mixgrpo sample``. Its images are ``size × size``."""
        return ModelFacts(height=self.size, width=self.size)


@hookimpl
def register_backbones(register):
    register("toy", ToyBackbone)
