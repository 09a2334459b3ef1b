"""A procedural world of coloured shapes with GenEval-like prompts; nothing is downloaded.

Scenes are drawn from a closed vocabulary (kind, colour, count, relative position) at four levels:

1. ``"a red circle"``                          one object
2. ``"two blue squares"``                      counting
3. ``"a red circle and a green square"``       two objects (always of different colours)
4. ``"a red circle left of a blue triangle"``  relative position

Images are 32×32 RGB float in [0, 1] on a black background, anti-aliased by 4× supersampling.
Everything is a pure function of a seed. A fixed 20% of the distinct scenes of each level (chosen by
a hash of the scene, so both phrasings of one scene fall on the same side) is held out as the
``eval`` split and never drawn for ``train``.

Kinds are axis-aligned: circles, squares and isosceles triangles (apex up, base = height), each
with a bounding-box side drawn from ``SIZE_RANGE``.

``detect_objects`` is the inverse measurement used by the rewards: colour segmentation against the
palette, connected components, and a shape test from the soft fill of the bounding box (square 1,
circle π/4) and the centroid's offset from the box centre (triangles only).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import attrs
import numpy as np
import torch

IMAGE_SIZE = 32
KINDS = ("circle", "square", "triangle")
#: saturated colours whose chromaticities (colour / max channel) stay far apart after blurring
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND = (0.0, 0.0, 0.0)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
LEVELS = (1, 2, 3, 4)
SPLITS = ("train", "eval")
EVAL_FRACTION = 0.2
SIZE_RANGE = (7.0, 11.0)  # object bounding-box side in pixels
SUPERSAMPLE = 4


# -- specs and prompts ------------------------------------------------------------------------------
@attrs.frozen
class ObjectSpec:
    """``count`` objects of one ``kind`` and ``colour``."""

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    colour: str = attrs.field(validator=attrs.validators.in_(tuple(COLOURS)))
    count: int = attrs.field(default=1, validator=attrs.validators.in_(tuple(COUNT_WORDS)))


@attrs.frozen
class SceneSpec:
    """One or two objects, and for two objects optionally ``objects[0] <relation> objects[1]``.

    Two objects always have different colours and count 1 (colour is how the checker tells them apart).
    """

    objects: tuple[ObjectSpec, ...] = attrs.field(converter=tuple)
    relation: str | None = None

    def __attrs_post_init__(self) -> None:
        n = len(self.objects)
        if n not in (1, 2):
            raise ValueError(f"a scene has one or two objects, got {n}")
        if self.relation is not None and (self.relation not in RELATIONS or n != 2):
            raise ValueError(f"relation {self.relation!r} needs two objects and one of {RELATIONS}")
        if n == 2:
            a, b = self.objects
            if a.count != 1 or b.count != 1 or a.colour == b.colour:
                raise ValueError(f"two-object scenes need single objects of different colours, got "
                                 f"{_object_phrase(a)!r} and {_object_phrase(b)!r}")

    @property
    def level(self) -> int:
        """1 one object, 2 counting, 3 two objects, 4 relative position."""
        if len(self.objects) == 2:
            return 4 if self.relation else 3
        return 1 if self.objects[0].count == 1 else 2


def _object_phrase(obj: ObjectSpec) -> str:
    return f"{COUNT_WORDS[obj.count]} {obj.colour} {obj.kind}{'s' if obj.count > 1 else ''}"


def prompt_of(spec: SceneSpec) -> str:
    """The prompt of a scene, e.g. ``"a red circle left of a blue triangle"``."""
    phrases = [_object_phrase(o) for o in spec.objects]
    if len(phrases) == 1:
        return phrases[0]
    return f" {spec.relation or 'and'} ".join(phrases)


def _parse_object(words: list[str], text: str) -> ObjectSpec:
    counts = {w: n for n, w in COUNT_WORDS.items()}
    if len(words) != 3:
        raise ValueError(f"cannot parse prompt {text!r}: expected '<count> <colour> <kind>', got {' '.join(words)!r}")
    count_word, colour, noun = words
    if count_word not in counts:
        raise ValueError(f"cannot parse prompt {text!r}: unknown count word {count_word!r}; "
                         f"expected one of {', '.join(counts)}")
    if colour not in COLOURS:
        raise ValueError(f"cannot parse prompt {text!r}: unknown colour {colour!r}; colours: {', '.join(COLOURS)}")
    count = counts[count_word]
    nouns = {k + "s" if count > 1 else k: k for k in KINDS}
    if noun not in nouns:
        form = "plural" if count > 1 else "singular"
        raise ValueError(f"cannot parse prompt {text!r}: expected a {form} kind after {count_word!r} "
                         f"({', '.join(nouns)}), got {noun!r}")
    return ObjectSpec(nouns[noun], colour, count)


def _find_link(words: list[str], text: str) -> tuple[int, int, str | None] | None:
    """Position, width in words and relation of the word(s) joining two objects, if any."""
    for i, word in enumerate(words):
        if word in ("and", "above", "below"):
            return i, 1, None if word == "and" else word
        if word in ("left", "right"):
            if words[i + 1: i + 2] != ["of"]:
                raise ValueError(f"cannot parse prompt {text!r}: expected 'of' after {word!r}")
            return i, 2, f"{word} of"
    return None


def parse_prompt(text: str) -> SceneSpec:
    """The exact inverse of ``prompt_of`` (case and extra whitespace are ignored).

    Raises:
        ValueError: naming the word that is outside the grammar, or the rule a scene breaks.
    """
    words = text.strip().lower().split()
    if not words:
        raise ValueError("cannot parse an empty prompt")
    unknown = [w for w in words if w not in _VOCABULARY]
    if unknown:
        raise ValueError(f"cannot parse prompt {text!r}: unknown word {unknown[0]!r}; "
                         f"the shapes grammar knows: {', '.join(sorted(_VOCABULARY))}")
    link = _find_link(words, text)
    if link is None:
        return SceneSpec((_parse_object(words, text),))
    i, width, relation = link
    objects = (_parse_object(words[:i], text), _parse_object(words[i + width:], text))
    try:
        return SceneSpec(objects, relation)
    except ValueError as err:
        raise ValueError(f"cannot parse prompt {text!r}: {err}") from None


_VOCABULARY = frozenset(
    {*COUNT_WORDS.values(), *COLOURS, *KINDS, *(k + "s" for k in KINDS), "and", *" ".join(RELATIONS).split()})


def vocabulary() -> list[str]:
    """Every word the grammar can produce (sorted), e.g. for a word-level tokenizer."""
    return sorted(_VOCABULARY)


# -- the scene catalogue and the train/eval split ------------------------------------------------
def _canonical(spec: SceneSpec) -> str:
    """A key shared by all phrasings of one scene ("A right of B" ≡ "B left of A")."""
    objs = list(spec.objects)
    rel = spec.relation
    if rel in ("right of", "below"):
        objs, rel = objs[::-1], {"right of": "left of", "below": "above"}[rel]
    elif rel is None and len(objs) == 2:
        objs = sorted(objs, key=_object_phrase)
    return f"{spec.level}|{rel}|" + "|".join(_object_phrase(o) for o in objs)


def _all_scenes(level: int) -> list[SceneSpec]:
    singles = [ObjectSpec(k, c) for c in COLOURS for k in KINDS]
    if level == 1:
        return [SceneSpec((o,)) for o in singles]
    if level == 2:
        return [SceneSpec((ObjectSpec(o.kind, o.colour, n),)) for n in (2, 3) for o in singles]
    pairs = [(a, b) for a in singles for b in singles if a.colour != b.colour]
    relations = [None] if level == 3 else list(RELATIONS)
    return [SceneSpec((a, b), rel) for rel in relations for a, b in pairs]


@functools.cache
def _catalogue(level: int) -> dict[str, tuple[SceneSpec, ...]]:
    """All scenes of a level, split into ``train`` and ``eval``."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; levels: {LEVELS}")
    scenes = _all_scenes(level)
    keys = sorted({_canonical(s) for s in scenes}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    held_out = set(keys[: max(1, round(EVAL_FRACTION * len(keys)))])
    return {"train": tuple(s for s in scenes if _canonical(s) not in held_out),
            "eval": tuple(s for s in scenes if _canonical(s) in held_out)}


def scenes(level: int, split: str) -> tuple[SceneSpec, ...]:
    """Every scene (each phrasing) of ``level`` in ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    return _catalogue(level)[split]


def split_of(spec: SceneSpec) -> str:
    """``"train"`` or ``"eval"``: the side of the split ``spec`` falls on."""
    return "eval" if spec in _catalogue(spec.level)["eval"] else "train"


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_specs(rng: np.random.Generator | int, count: int, levels: Sequence[int] = LEVELS,
                 split: str = "train") -> list[SceneSpec]:
    """``count`` scenes: a level uniformly from ``levels``, then a scene of it uniformly from ``split``."""
    rng, levels = _as_rng(rng), tuple(levels)
    pools = [scenes(level, split) for level in levels]
    which = rng.integers(len(levels), size=count)
    picks = rng.random(count)
    return [pools[w][int(p * len(pools[w]))] for w, p in zip(which, picks)]


def sample_prompts(split: str, count: int, seed: int, levels: Sequence[int] = LEVELS) -> list[str]:
    """``count`` prompts of ``split`` drawn under ``seed`` (the two splits never share a prompt)."""
    return [prompt_of(s) for s in sample_specs(seed, count, levels=levels, split=split)]


# -- rendering ----------------------------------------------------------------------------------
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


# -- detection ----------------------------------------------------------------------------------
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
