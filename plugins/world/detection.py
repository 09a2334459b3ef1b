"""Detecting the objects of a rendered (or generated) image, the measurement the rewards use: colour
segmentation against the palette, connected components, and a shape test from the soft fill of the
bounding box and the centroid's offset from its centre."""

from __future__ import annotations

import attrs
import numpy as np
import torch

from mixgrpo.plugins.world.scenes import (
    COLOURS,
    IMAGE_SIZE,
)

#: a pixel is foreground when its brightest channel reaches this (half-covered palette pixels do)
FOREGROUND_LEVEL = 0.4
#: largest distance of a pixel's chromaticity (colour / brightest channel) from its palette colour
MAX_CHROMA_DISTANCE = 0.6
#: blobs smaller than this many pixels (at 32×32; scaled with the image area) are noise (the
#: smallest rendered object, a 7-pixel triangle, has ≈ 25)
MIN_AREA = 12.0
#: soft fill of the bounding box: square 1, circle ≈ 0.79 (0.77–0.89 under blur up to 1 px)
SQUARE_FILL = 0.91
#: centroid offset from the box centre, in box sides: triangles ≈ 0.13, circles and squares ≈ 0
TRIANGLE_SKEW = 0.06
#: blobs filling less of their box than this are not shapes (noise specks, smears); triangles ≈ 0.59
MIN_FILL = 0.4


@attrs.frozen
class Detection:
    """A blob of one palette colour: its kind, centre and size in pixels (x right, y down)."""

    colour: str
    kind: str
    cx: float  # bounding-box centre
    cy: float
    area: float  # pixels at or above FOREGROUND_LEVEL
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (pixel edges)
    fill: float  # soft area / soft box area
    skew: float  # largest centroid offset from the box centre, in box sides


def classify_pixels(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of [B, 3, H, W]: the foreground palette index (-1 for background or off-palette),
    the brightness (max channel) and the nearest palette index regardless of brightness, each [B, H, W]."""
    value = images.max(axis=1)
    chroma = images / np.maximum(value, 1e-6)[:, None]
    palette = np.asarray(list(COLOURS.values()), np.float32)
    dist = ((chroma[:, None] - palette[None, :, :, None, None]) ** 2).sum(axis=2)  # [B, K, H, W]
    nearest = dist.argmin(axis=1)
    near = np.take_along_axis(dist, nearest[:, None], 1)[:, 0] <= MAX_CHROMA_DISTANCE**2
    return np.where((value >= FOREGROUND_LEVEL) & near, nearest, -1), value, np.where(near, nearest, -1)


def connected_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative class: [B, H, W] → int64 [B, H, W] component
    ids (the flat index of one member pixel; -1 for background). Min-label propagation with pointer
    jumping, all images at once."""
    fg = classes >= 0
    big = classes.size
    labels = np.where(fg, np.arange(big).reshape(classes.shape), big)
    links = []
    for axis in (1, 2):  # pixel and its next neighbour along y or x share a class (no wrap-around)
        same = fg & np.roll(fg, -1, axis) & (classes == np.roll(classes, -1, axis))
        same[(slice(None),) * axis + (-1,)] = False
        links.append((axis, same, np.roll(same, 1, axis)))
    while True:
        new = labels
        for axis, fwd, back in links:
            new = np.where(fwd, np.minimum(new, np.roll(labels, -1, axis)), new)
            new = np.where(back, np.minimum(new, np.roll(labels, 1, axis)), new)
        new = np.where(fg, np.append(new.ravel(), big)[new], big)  # pointer jumping: a label's label
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def _shape_of(cov: np.ndarray) -> tuple[str, float, float]:
    """Kind, soft fill and skew of a blob's soft coverage patch [h, w] in [0, 1].

    Soft extents (the sum of each column's / row's peak coverage) make the fill exact under
    anti-aliasing; a triangle's centroid sits off its box centre, a circle's and a square's do not.
    """
    area = cov.sum()
    cols, rows = cov.max(axis=0), cov.max(axis=1)
    fill = float(area / max(cols.sum() * rows.sum(), 1e-6))
    skews = []
    for profile, mass in ((cols, cov.sum(axis=0)), (rows, cov.sum(axis=1))):
        pos = np.arange(len(profile)) + 0.5
        centre = (profile * pos).sum() / max(profile.sum(), 1e-6)
        skews.append(abs((mass * pos).sum() / max(area, 1e-6) - centre) / max(profile.sum(), 1e-6))
    skew = float(max(skews))
    kind = "triangle" if skew >= TRIANGLE_SKEW else "square" if fill >= SQUARE_FILL else "circle"
    return kind, fill, skew


def _blob(b: int, ys: np.ndarray, xs: np.ndarray, cid: int, comps, value, nearest) -> Detection:
    """The ``Detection`` of component ``cid`` (pixels ``ys, xs`` of image ``b``)."""
    colour = int(nearest[b, ys[0], xs[0]])
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    # soft coverage over the box and a 1-pixel ring: this blob's pixels and faint ones of its colour
    # that belong to no other blob
    win = (b, slice(max(y0 - 1, 0), y1 + 1), slice(max(x0 - 1, 0), x1 + 1))
    mine = (comps[win] == cid) | ((comps[win] < 0) & (nearest[win] == colour))
    patch = np.where(mine, value[win], 0.0)
    kind, fill, skew = _shape_of(np.clip(patch / max(patch.max(), 1e-6), 0.0, 1.0))
    return Detection(list(COLOURS)[colour], kind, float(x0 + x1) / 2, float(y0 + y1) / 2, float(len(xs)),
                     (float(x0), float(y0), float(x1), float(y1)), fill, skew)


def detect_batch(images: torch.Tensor | np.ndarray) -> list[list[Detection]]:
    """Objects in each image [B, 3, H, W] in [0, 1]: one ``Detection`` per blob of a palette colour
    with at least ``MIN_AREA`` pixels (scaled by H·W / 32²) and ``MIN_FILL``, in a fixed order."""
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
    classes, value, nearest = classify_pixels(np.nan_to_num(x, nan=0.0).clip(0.0, 1.0))
    comps = connected_components(classes)
    min_area = MIN_AREA * x.shape[2] * x.shape[3] / IMAGE_SIZE**2
    found: list[list[Detection]] = [[] for _ in range(len(x))]
    pixels = np.flatnonzero(comps >= 0)
    pixels = pixels[np.argsort(comps.ravel()[pixels], kind="stable")]  # grouped by component
    ids, starts, counts = np.unique(comps.ravel()[pixels], return_index=True, return_counts=True)
    for cid, start, count in zip(ids, starts, counts):
        if count >= min_area:
            b, ys, xs = np.unravel_index(pixels[start:start + count], comps.shape)
            blob = _blob(int(b[0]), ys, xs, int(cid), comps, value, nearest)
            if blob.fill >= MIN_FILL:
                found[b[0]].append(blob)
    return found


def detect_objects(image: torch.Tensor | np.ndarray) -> list[Detection]:
    """Objects in one image [3, H, W] in [0, 1] (see ``detect_batch``)."""
    if image.ndim != 3:
        raise ValueError(f"expected an image [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
    return detect_batch(image[None])[0]
