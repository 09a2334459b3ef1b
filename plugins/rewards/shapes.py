"""Rewards for the procedural shapes world (``mixgrpo.plugins.world.shapes``).

- ``shapes.composition``: a programmatic GenEval-like checker with partial credit.
- ``shapes.preference``: a smooth, preference-like score that varies continuously with the pixels.
- ``shapes.brightness``: the mean brightness, whatever the prompt: a proxy made to be hacked (a
  policy trained on it paints every image bright; ``experiments/shapes/hacking.gin``).

Both score images ``[B, 3, H, W]`` in [0, 1] against prompts of the world's grammar and return
``[B]`` float32 on the images' device; a prompt outside the grammar scores NaN (never 0).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Reward
from mixgrpo.plugins.world.shapes import (
    COLOURS,
    IMAGE_SIZE,
    SIZE_RANGE,
    Detection,
    SceneSpec,
    detect_batch,
    parse_prompt,
)

_COLOUR_NAMES = list(COLOURS)


def _check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {got}")
    if not images.is_floating_point():
        raise ValueError(f"expected images [B, 3, H, W] float in [0, 1], got dtype {images.dtype}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"expected one prompt per image ({images.shape[0]}), got {n}")


class _ParsingReward(Reward):
    """Parses prompts, warning once per instance about prompts outside the grammar."""

    def __init__(self) -> None:
        self._warned = False

    def _parse(self, prompts: Sequence[str]) -> list[SceneSpec | None]:
        specs: list[SceneSpec | None] = []
        for prompt in prompts:
            try:
                specs.append(parse_prompt(prompt))
            except ValueError as err:
                if not self._warned:
                    warnings.warn(f"{self.name}: scoring NaN for prompts outside the shapes grammar; "
                                  f"first: {err}", RuntimeWarning, stacklevel=3)
                    self._warned = True
                specs.append(None)
        return specs


# -- the compositional checker ------------------------------------------------------------------
def relative_position(a: Detection, b: Detection, threshold: float = 0.1) -> set[str]:
    """Relations of ``a`` to ``b`` from their boxes, as GenEval decides them: the centre offset,
    shrunk by ``threshold`` × the summed box sides, must point within 60° of the relation's axis."""
    off = (a.cx - b.cx, a.cy - b.cy)
    dims = ((a.box[2] - a.box[0]) + (b.box[2] - b.box[0]), (a.box[3] - a.box[1]) + (b.box[3] - b.box[1]))
    norm = math.hypot(*off)
    rev = [math.copysign(max(abs(o) - threshold * d, 0.0), o) for o, d in zip(off, dims)]
    if norm == 0 or max(abs(r) for r in rev) < 1e-3:
        return set()
    dx, dy = rev[0] / norm, rev[1] / norm
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {rel for rel, ok in found.items() if ok}


def composition_checks(spec: SceneSpec, detections: Sequence[Detection]) -> dict[str, float]:
    """The checks of ``spec`` on an image's ``detections``, each in [0, 1], plus ``extra`` (the
    number of blobs of colours the prompt does not mention).

    Per object i: ``i.present`` (a blob of its colour), ``i.count`` (exactly ``count`` such blobs),
    ``i.kind`` (the fraction of those blobs of the right kind). With a relation: ``relation``, on
    the largest blob of each colour.
    """
    checks: dict[str, float] = {}
    for i, obj in enumerate(spec.objects):
        mine = [d for d in detections if d.colour == obj.colour]
        checks[f"{i}.present"] = float(bool(mine))
        checks[f"{i}.count"] = float(len(mine) == obj.count)
        checks[f"{i}.kind"] = sum(d.kind == obj.kind for d in mine) / len(mine) if mine else 0.0
    if spec.relation is not None:
        a, b = ([d for d in detections if d.colour == o.colour] for o in spec.objects)
        largest = (max(a, key=lambda d: d.area), max(b, key=lambda d: d.area)) if a and b else None
        checks["relation"] = float(largest is not None and spec.relation in relative_position(*largest))
    mentioned = {o.colour for o in spec.objects}
    checks["extra"] = float(sum(d.colour not in mentioned for d in detections))
    return checks


class CompositionReward(_ParsingReward):
    """GenEval-like compositional score with partial credit, in [0, 1].

    The score is the weighted fraction of satisfied checks (``composition_checks``: presence, count
    and kind of each prompt object, each weight 1, and the relation, weight ``relation_weight``),
    times ``(1 − extra_penalty)`` per blob of a colour the prompt does not mention. Rendered ground
    truth scores exactly 1.

    Args:
        relation_weight: weight of the relation check (3 = as much as one object's three checks).
        extra_penalty: fraction taken off per blob of an unmentioned colour.
        strict: score 1 only if every check passes and nothing extra is drawn, else 0 (GenEval's
            all-or-nothing accuracy, for evaluation).
    """

    name = "shapes.composition"

    def __init__(self, relation_weight: float = 3.0, extra_penalty: float = 0.1, strict: bool = False) -> None:
        super().__init__()
        self.relation_weight = relation_weight
        self.extra_penalty = extra_penalty
        self.strict = strict

    def score(self, spec: SceneSpec, detections: Sequence[Detection]) -> float:
        """The score in [0, 1] of one image's ``detections`` against ``spec``."""
        checks = composition_checks(spec, detections)
        extra = checks.pop("extra")
        if self.strict:
            return float(extra == 0 and all(v == 1.0 for v in checks.values()))
        weights = {k: self.relation_weight if k == "relation" else 1.0 for k in checks}
        total = sum(weights[k] * v for k, v in checks.items()) / sum(weights.values())
        return total * (1.0 - self.extra_penalty) ** extra

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] and ``B`` prompts → ``[B]`` float32 (NaN: unparseable
        prompt or non-finite image)."""
        _check_inputs(images, prompts)
        specs = self._parse(prompts)
        finite = torch.isfinite(images).flatten(1).all(dim=1).tolist()
        detections = detect_batch(images)
        scores = [self.score(s, d) if s is not None and ok else math.nan
                  for s, d, ok in zip(specs, detections, finite)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


# -- the smooth preference score ----------------------------------------------------------------
def _mean_side_squared() -> float:
    lo, hi = SIZE_RANGE
    return (hi**3 - lo**3) / (3 * (hi - lo))  # E[s²] for s ~ U(lo, hi)


#: expected pixel area of one object of each kind at 32×32 (box side s ~ U(7, 11))
MEAN_AREA = {kind: fill * _mean_side_squared() for kind, fill in
             (("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5))}
#: Σ v² of an anti-aliased object over its area (measured: 0.90 triangles to 0.94 squares)
EDGE_LOSS = 0.92


def soft_colour_maps(images: torch.Tensor, temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness ``v`` [B, H, W] (max channel) and soft palette membership ``p`` [B, K, H, W].

    ``p`` is a softmax over the palette of ``−‖chroma − colour‖² / temperature``, where the chroma
    is the pixel divided by its brightness: a half-covered edge pixel or a blurred one belongs
    fully to its object's colour, only its brightness drops.
    """
    v = images.amax(dim=1)
    chroma = images / v.clamp_min(1e-3)[:, None]
    palette = torch.tensor(list(COLOURS.values()), dtype=images.dtype, device=images.device)
    dist = ((chroma[:, None] - palette[None, :, :, None, None]) ** 2).sum(dim=2)
    return v, torch.softmax(-dist / temperature, dim=1)


def _targets(specs: Sequence[SceneSpec | None], area_scale: float, device) -> tuple[torch.Tensor, ...]:
    """Expected mass [B, K], mentioned-colour mask [B, K], relation (a, b, axis, sign) [B, 4]."""
    expected = torch.zeros(len(specs), len(COLOURS))
    relation = torch.full((len(specs), 4), -1, dtype=torch.long)
    axes = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}
    for i, spec in enumerate(specs):
        for obj in spec.objects if spec is not None else ():
            expected[i, _COLOUR_NAMES.index(obj.colour)] += obj.count * MEAN_AREA[obj.kind] * EDGE_LOSS * area_scale
        if spec is not None and spec.relation is not None:
            a, b = (_COLOUR_NAMES.index(o.colour) for o in spec.objects)
            relation[i] = torch.tensor([a, b, *axes[spec.relation]])
    return expected.to(device), (expected > 0).to(device), relation.to(device)


class PreferenceReward(_ParsingReward):
    """A smooth preference-like score in [0, 1]:
    ``content · (1 − clean_weight·(1 − clean) − sharp_weight·(1 − sharp))``.

    It rewards images that contain the prompt's colours in the right amounts (and arrangement),
    drawn in clean palette colours with crisp edges; without the content (a blank image, the wrong
    colours) cleanliness and sharpness earn nothing. Every term is a smooth function of the pixels
    (no thresholds, no argmax), so the score changes a little with every small change of the image.

    - ``content``: per mentioned colour, its soft mass ``Σ v²·p`` (squared brightness, so a faint
      haze weighs little) against the mass expected for the prompt's count and kind,
      ``1 / (1 + (log ratio / 0.9)⁴)`` (flat within the size range, near 0 when the colour is
      missing or floods the image); with a relation, a sigmoid of the soft centroids' separation
      (2 px scale) along its axis times both colours' matches; averaged, then times
      ``exp(−extra / 40 px)`` for the mass of unmentioned colours.
    - ``clean``: ``exp(−mean ‖x − v·palette‖² / 0.005)``: pixels are palette colours at some
      brightness (black background, anti-aliased edges); noise and off-palette tints lower it.
    - ``sharp``: the half-lit share of the drawn mass ``u = Σ 4v²(1−v) / (Σ v² + 1)`` (≈ 0.18 for
      anti-aliased ground truth, rising as blur spreads edges), as ``1 / (1 + (u / 0.5)²)``.

    Args:
        temperature: softness of the palette membership (squared chroma distance).
        clean_weight: the share of the score that cleanliness can take away.
        sharp_weight: the share of the score that blur can take away.
    """

    name = "shapes.preference"

    def __init__(self, temperature: float = 0.1, clean_weight: float = 0.3, sharp_weight: float = 0.3) -> None:
        super().__init__()
        if min(clean_weight, sharp_weight) < 0 or clean_weight + sharp_weight > 1:
            raise ValueError(f"clean_weight and sharp_weight must be ≥ 0 with a sum ≤ 1, got "
                             f"{clean_weight} and {sharp_weight}")
        self.temperature = temperature
        self.clean_weight, self.sharp_weight = clean_weight, sharp_weight

    def terms(self, images: torch.Tensor, specs: Sequence[SceneSpec | None]) -> dict[str, torch.Tensor]:
        """The three terms, each [B] in [0, 1], for images [B, 3, H, W] in [0, 1] (fp32)."""
        _, _, h, w = images.shape
        area_scale = h * w / IMAGE_SIZE**2
        v, p = soft_colour_maps(images, self.temperature)
        mass_map = v[:, None] ** 2 * p  # [B, K, H, W]; squared so that a faint haze weighs little
        mass = mass_map.sum(dim=(2, 3))
        expected, mentioned, relation = _targets(specs, area_scale, images.device)
        ratio = torch.log((mass + 1.0) / (expected + 1.0))
        match = torch.where(mentioned, 1.0 / (1.0 + (ratio / 0.9) ** 4), torch.zeros_like(mass))
        extra = torch.where(mentioned, torch.zeros_like(mass), mass).sum(dim=1)
        parts, count = match.sum(dim=1), mentioned.sum(dim=1).float()
        has_rel = relation[:, 0] >= 0
        if has_rel.any():
            rel = self._relation_term(mass_map, mass, relation)
            a, b = relation[:, 0].clamp_min(0)[:, None], relation[:, 1].clamp_min(0)[:, None]
            rel = rel * match.gather(1, a)[:, 0] * match.gather(1, b)[:, 0]  # no credit without both
            parts = parts + torch.where(has_rel, rel, 0.0)
            count = count + has_rel.float()
        content = parts / count.clamp_min(1.0) * torch.exp(-extra / (40.0 * area_scale))
        ideal = v[:, None, None] * torch.tensor(list(COLOURS.values()), device=images.device)[None, :, :, None, None]
        residual = (p * ((images[:, None] - ideal) ** 2).sum(dim=2)).sum(dim=1)  # [B, H, W]
        clean = torch.exp(-residual.mean(dim=(1, 2)) / 0.005)
        v2 = v**2
        half_lit = (4 * v2 * (1 - v)).sum(dim=(1, 2)) / (v2.sum(dim=(1, 2)) + area_scale)
        sharp = 1.0 / (1.0 + (half_lit / 0.5) ** 2)
        return {"content": content, "clean": clean, "sharp": sharp}

    @staticmethod
    def _relation_term(mass_map: torch.Tensor, mass: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        """Sigmoid of the soft-centroid separation (2 px scale) along each sample's relation axis."""
        h, w = mass_map.shape[-2:]
        ys = torch.arange(h, device=mass_map.device, dtype=mass_map.dtype) + 0.5
        xs = torch.arange(w, device=mass_map.device, dtype=mass_map.dtype) + 0.5
        cx = (mass_map.sum(dim=2) * xs).sum(dim=2) / (mass + 1e-3)  # [B, K]
        cy = (mass_map.sum(dim=3) * ys).sum(dim=2) / (mass + 1e-3)
        a, b, axis, sign = relation.unbind(dim=1)
        a, b = a.clamp_min(0), b.clamp_min(0)  # samples without a relation (-1) are masked later
        centre = torch.where((axis == 0)[:, None], cx, cy)
        gap = (centre.gather(1, b[:, None]) - centre.gather(1, a[:, None]))[:, 0]
        return torch.sigmoid(gap * sign.to(gap.dtype) / 2.0)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] and ``B`` prompts → ``[B]`` float32 (NaN: unparseable
        prompt or non-finite image). Differentiable with respect to the images."""
        _check_inputs(images, prompts)
        specs = self._parse(prompts)
        x = images.float()
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        x = torch.where(finite[:, None, None, None], x, torch.zeros_like(x)).clamp(0.0, 1.0)
        terms = self.terms(x, specs)
        quality = 1 - self.clean_weight * (1 - terms["clean"]) - self.sharp_weight * (1 - terms["sharp"])
        score = terms["content"] * quality
        valid = finite & torch.tensor([s is not None for s in specs], device=x.device)
        return torch.where(valid, score, torch.full_like(score, math.nan)).float()


# -- a reward made to be hacked ------------------------------------------------------------------
class BrightnessReward(_ParsingReward):
    """The mean brightness (max channel) of the image in [0, 1], blind to the prompt: the proxy a
    policy games by painting everything bright, at the cost of the shapes the prompt asks for. Paired
    with the held-out ``shapes.composition`` it shows what reward hacking looks like in the
    evaluations (``mixgrpo.core.hacking``); it is no objective to train a model for."""

    name = "shapes.brightness"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] and ``B`` prompts → ``[B]`` float32 (NaN: unparseable
        prompt or non-finite image)."""
        _check_inputs(images, prompts)
        valid = torch.tensor([s is not None for s in self._parse(prompts)], device=images.device)
        x = images.float()
        valid &= torch.isfinite(x).flatten(1).all(dim=1)
        score = x.nan_to_num(0.0).clamp(0.0, 1.0).amax(dim=1).flatten(1).mean(dim=1)
        return torch.where(valid, score, torch.full_like(score, math.nan))


@hookimpl
def register_rewards(register):
    register("shapes.composition", CompositionReward)
    register("shapes.preference", PreferenceReward)
    register("shapes.brightness", BrightnessReward)
