"""Pictures people would rather look at than read: sample grids and reward curves (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def save_sample_grid(images: torch.Tensor, captions: Sequence[str], path: Path, columns: int = 4) -> Path:
    """Write images ``[N, 3, H, W]`` in [0, 1] as a captioned PNG grid (atomically)."""
    n = images.shape[0]
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(captions[k], 24)), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


#: per-image held-out scores of every evaluation of a run: one JSON line per evaluation,
#: ``{"iteration": k, "<reward name>": [score per image, ...]}``
from mixgrpo.core.records import EVAL_SCORES  # noqa: E402,F401 (re-exported)


def slug(label: str) -> str:
    """A variant label as a file name: every run of characters outside ``A-Z a-z 0-9 _ . -``
    becomes ``_`` (so ``MixGRPO-Flash*`` and ``MixGRPO-Flash`` stay apart)."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    return out if out.strip("_.") else "variant"


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
