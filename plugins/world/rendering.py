"""Rendering a scene spec to a 32×32 RGB image: rejection-sampled layouts that satisfy the relation,
anti-aliased rasterisation by supersampling. A pure function of the seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mixgrpo.plugins.world.scenes import (
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    KINDS,
    SIZE_RANGE,
    SUPERSAMPLE,
    SceneSpec,
    _as_rng,
    parse_prompt,
    prompt_of,
)

_GAP = 2.0  # minimum gap in pixels between bounding boxes, so blobs never touch
_MARGIN = 1.0  # minimum distance of a box from the image border
_MIN_SHIFT = 6.0  # "left of": centre x at least this much smaller (and the offset mostly horizontal)
_CANDIDATES = 64  # layouts tried at once by rejection sampling


def _instances(spec: SceneSpec) -> list[tuple[str, str]]:
    return [(o.kind, o.colour) for o in spec.objects for _ in range(o.count)]


def _relation_ok(centres: np.ndarray, relation: str | None) -> np.ndarray:
    """[T, k, 2] candidate centres → [T] whether object 0 stands in ``relation`` to object 1."""
    if relation is None:
        return np.ones(len(centres), dtype=bool)
    d = centres[:, 1] - centres[:, 0]  # B − A: positive x means A is left of B
    along, across = {"left of": (d[:, 0], d[:, 1]), "right of": (-d[:, 0], d[:, 1]),
                     "above": (d[:, 1], d[:, 0]), "below": (-d[:, 1], d[:, 0])}[relation]
    return (along >= _MIN_SHIFT) & (np.abs(across) <= 0.5 * along)


def _layout(spec: SceneSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Centres [k, 2] (x, y) and sizes [k] of the scene's instances: non-overlapping, relation held."""
    k = len(_instances(spec))
    for _ in range(100):
        sizes = rng.uniform(*SIZE_RANGE, size=k)
        lo, hi = sizes / 2 + _MARGIN, IMAGE_SIZE - sizes / 2 - _MARGIN
        centres = lo[None, :, None] + rng.random((_CANDIDATES, k, 2)) * (hi - lo)[None, :, None]
        ok = _relation_ok(centres, spec.relation)
        for i in range(k):
            for j in range(i + 1, k):
                reach = (sizes[i] + sizes[j]) / 2 + _GAP
                ok &= np.abs(centres[:, i] - centres[:, j]).max(axis=1) >= reach
        if ok.any():
            return centres[int(np.argmax(ok))], sizes
    raise RuntimeError(f"could not lay out {prompt_of(spec)!r}")  # pragma: no cover (never seen)


_WINDOW = 14  # pixels: a local raster window holds any object (side ≤ 11 plus a sub-pixel offset)


def _coverage(kinds: np.ndarray, centres: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage [N, W, W] in [0, 1] of N shapes, and each window's top-left pixel [N, 2].

    Each window is rasterised at ``SUPERSAMPLE``× and average-pooled, all N at once.
    """
    origin = np.floor(centres).astype(np.int64) - _WINDOW // 2
    steps = (np.arange(_WINDOW * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    dx = (origin[:, 0, None] + steps[None, :] - centres[:, 0, None])[:, None, :]  # [N, 1, S]
    dy = (origin[:, 1, None] + steps[None, :] - centres[:, 1, None])[:, :, None]  # [N, S, 1]
    h = (sizes / 2)[:, None, None]
    inside = np.where(
        (kinds == 0)[:, None, None], dx**2 + dy**2 <= h**2,
        np.where((kinds == 1)[:, None, None], (np.abs(dx) <= h) & (np.abs(dy) <= h),
                 (np.abs(dy) <= h) & (2 * np.abs(dx) <= dy + h)))  # triangle: apex up, base = height
    n, s = len(kinds), SUPERSAMPLE
    cov = inside.reshape(n, _WINDOW, s, _WINDOW, s).mean(axis=(2, 4), dtype=np.float32)
    return cov, origin


def _rasterise(layouts: list[tuple[SceneSpec, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Images [B, 3, 32, 32] float32 from (spec, centres, sizes) per image."""
    kinds, colours, centres, sizes, owner = [], [], [], [], []
    for b, (spec, c, s) in enumerate(layouts):
        for kind, colour in _instances(spec):
            kinds.append(KINDS.index(kind))
            colours.append(COLOURS[colour])
            owner.append(b)
        centres.append(c)
        sizes.append(s)
    cov, origin = _coverage(np.array(kinds), np.concatenate(centres), np.concatenate(sizes))
    pad = _WINDOW  # a padded canvas takes windows that stick out of the image
    paint = np.zeros((len(layouts), 3, IMAGE_SIZE + 2 * pad, IMAGE_SIZE + 2 * pad), np.float32)
    bg = np.asarray(BACKGROUND, np.float32)
    tint = np.asarray(colours, np.float32) - bg
    for i, b in enumerate(owner):  # shapes never overlap (layouts keep a gap), so coverages add
        (x0, y0), w = origin[i] + pad, _WINDOW
        paint[b, :, y0:y0 + w, x0:x0 + w] += tint[i][:, None, None] * cov[i]
    images = bg[None, :, None, None] + paint
    return images[:, :, pad:pad + IMAGE_SIZE, pad:pad + IMAGE_SIZE].clip(0.0, 1.0)


def render(spec: SceneSpec, rng: np.random.Generator | int) -> np.ndarray:
    """One image of ``spec``: float32 [3, 32, 32] in [0, 1], random layout drawn from ``rng``."""
    rng = _as_rng(rng)
    return _rasterise([(spec, *_layout(spec, rng))])[0]


def render_batch(specs: Sequence[SceneSpec | str], seed: int | np.random.Generator) -> torch.Tensor:
    """Images of ``specs`` (scenes or prompts): float32 tensor [B, 3, 32, 32] in [0, 1], a pure
    function of ``(specs, seed)``."""
    rng = _as_rng(seed)
    specs = [parse_prompt(s) if isinstance(s, str) else s for s in specs]
    if not specs:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return torch.from_numpy(_rasterise([(s, *_layout(s, rng)) for s in specs]))
