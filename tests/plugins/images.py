"""Image helpers the shapes-world tests share."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, 3, H, W] with reflect padding (σ = 0: unchanged)."""
    if sigma == 0:
        return images
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1.0) / sigma) ** 2)
    k = k / k.sum()
    b, c, h, w = images.shape
    x = images.reshape(b * c, 1, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w)
