"""Reward hacking made visible: what a held-out evaluation measures besides the rewards, and the one
rule that reads the evaluations for a run that games its reward.

A policy that learns to please its reward model rather than the prompt shows it in three places the
trained reward cannot see: rewards it is not trained on fall, the images of one prompt collapse onto
one picture whatever the seed, and the velocity field drifts away from the base model. So every
held-out evaluation also reports

- ``eval/diversity/{mean,sem}``: per prompt, the mean pairwise L2 distance between the L2-normalised
  embeddings of its images over the sampling seeds (0 when every seed draws the same image, at most
  2), averaged over the prompts, with its standard error over prompts. The embedding is
  ``TrainConfig.eval_diversity``: ``'pixels'`` (the image average-pooled to 16×16, no model),
  ``'clip'`` (the image embedding of the CLIP model in the local folder ``eval_clip_path``);
- ``eval/kl_base/mean``: the mean over held-out prompts, seeds and ``KL_STEPS`` steps of the
  evaluation's ODE trajectory of ``mean((v_θ − v_base)²)`` over the latent's elements, the
  velocity-space KL of the forward-process objectives, with ``v_base`` from ``Backbone.reference()``.

``hacking_signals`` is the rule, shared by the trainer (a warning, and the optional stop of
``TrainConfig.stop_on_hacking``), the end-of-run summary, the model card and the comparison report.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mixgrpo.core import metrics as m
from mixgrpo.core.interfaces import Backbone
from mixgrpo.core.metrics import format_value
from mixgrpo.core.types import Conditioning

DIVERSITY_EMBEDDINGS = ("pixels", "clip", "none")
PIXEL_SIDE = 16  # the pixel embedding's side: coarse enough to ignore a pixel's noise, fine enough for layout
KL_STEPS = 3  # steps of the evaluation grid where the drift from the base is measured (first, middle, last)
# OpenAI CLIP's pixel normalisation (every CLIP checkpoint in diffusers pipelines uses it)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def check_config(config: Any) -> None:
    """The hacking settings of a ``TrainConfig``, refused with the fix before any model loads."""
    if config.eval_diversity not in DIVERSITY_EMBEDDINGS:
        raise ValueError(f"TrainConfig.eval_diversity = {config.eval_diversity!r}: one of "
                         f"{', '.join(map(repr, DIVERSITY_EMBEDDINGS))}")
    if config.eval_diversity == "clip" and not (Path(config.eval_clip_path) / "config.json").is_file():
        raise ValueError(f"TrainConfig.eval_diversity = 'clip' needs TrainConfig.eval_clip_path, a local folder "
                         f"holding a transformers CLIP model (config.json and weights; nothing is downloaded), "
                         f"got {config.eval_clip_path!r}; or measure in pixels: eval_diversity = 'pixels'")


# -- diversity -------------------------------------------------------------------------------------
def pixel_embedding(images: torch.Tensor, side: int = PIXEL_SIDE) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] → ``[N, 3·side²]`` float32: average-pooled to ``side``×``side``
    (an image smaller than that stays as it is), flattened, L2-normalised (a black image: zeros)."""
    x = images.detach().float()
    if x.shape[-1] > side or x.shape[-2] > side:
        x = F.adaptive_avg_pool2d(x, (min(side, x.shape[-2]), min(side, x.shape[-1])))
    return F.normalize(x.flatten(1), dim=1)


@functools.lru_cache(maxsize=2)
def _clip_model(path: str) -> Any:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)


@torch.no_grad()
def clip_embedding(images: torch.Tensor, path: str, batch_size: int = 32) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] → ``[N, D]`` float32 L2-normalised CLIP image embeddings of the
    local model ``path`` (loaded once per process): resized bicubically to its input side, normalised
    as CLIP was trained."""
    model = _clip_model(str(path))
    side = model.config.vision_config.image_size
    device = next(model.parameters()).device
    mean = torch.tensor(CLIP_MEAN, device=device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=device)[:, None, None]
    out = []
    for chunk in images.detach().float().split(batch_size):
        x = F.interpolate(chunk.to(device), size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        out.append(_features(model.get_image_features(pixel_values=(x.clamp(0, 1) - mean) / std)).float().cpu())
    return F.normalize(torch.cat(out), dim=1)


def _features(out: Any) -> torch.Tensor:
    """transformers ≥ 5 may return a model output whose pooled output is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def embed(images: torch.Tensor, kind: str, clip_path: str = "") -> torch.Tensor:
    """``[N, D]`` L2-normalised embeddings of ``images`` in the embedding ``kind`` (``DIVERSITY_EMBEDDINGS``)."""
    if kind == "pixels":
        return pixel_embedding(images)
    if kind == "clip":
        return clip_embedding(images, clip_path)
    raise ValueError(f"no diversity embedding {kind!r}: one of 'pixels', 'clip'")


def within_prompt_diversity(embeddings: torch.Tensor) -> tuple[float, float]:
    """``(mean, sem)`` of the per-prompt mean pairwise L2 distance of ``embeddings`` ``[S, P, D]``
    (S ≥ 2 sampling seeds of P prompts): the mean over prompts and its standard error over prompts
    (NaN with one prompt)."""
    seeds, prompts = embeddings.shape[:2]
    if seeds < 2:
        raise ValueError(f"diversity over sampling seeds needs at least 2 seeds per prompt, got {seeds}")
    e = embeddings.double().transpose(0, 1)  # [P, S, D]
    dist = torch.cdist(e, e)  # [P, S, S]
    upper = torch.triu(torch.ones(seeds, seeds, dtype=torch.bool), diagonal=1)
    per_prompt = dist[:, upper].mean(dim=1)  # [P]
    sem = per_prompt.std().item() / math.sqrt(prompts) if prompts > 1 else float("nan")
    return per_prompt.mean().item(), sem


def diversity_metrics(images: torch.Tensor, seeds: int, kind: str, clip_path: str = "") -> dict[str, float]:
    """``eval/diversity/{mean,sem}`` of held-out ``images`` ``[S·P, 3, H, W]``, laid out seed-major
    (image ``s·P + p`` is prompt p's at seed s, as ``evaluation.evaluate`` draws them); nothing with
    ``kind = 'none'`` or a single seed."""
    if kind == "none" or seeds < 2:
        return {}
    e = embed(images, kind, clip_path)
    mean, sem = within_prompt_diversity(e.reshape(seeds, -1, e.shape[-1]))
    return {m.DIVERSITY_MEAN: mean, m.DIVERSITY_SEM: sem}


# -- the drift from the base model -----------------------------------------------------------------
def base_available(objective_uses_reference: bool, lora_rank: int, kept_copy: bool) -> bool:
    """Whether ``Backbone.reference()`` runs the base model: a frozen copy taken before any update (the
    objective's KL term, or ``TrainConfig.kl_base_copy``), or LoRA (the adapters switched off). A full
    fine-tune without a copy has none: ``reference()`` would freeze the weights as they are now."""
    return objective_uses_reference or lora_rank > 0 or kept_copy


def probed_steps(num_steps: int, count: int = KL_STEPS) -> list[int]:
    """``count`` steps of a ``num_steps`` grid, evenly spread from the first to the last."""
    return sorted({round(i * (num_steps - 1) / max(count - 1, 1)) for i in range(min(count, num_steps))})


class VelocityDrift(Backbone):
    """``inner`` as ``sample_ode`` sees it, measuring on the way the drift from the base: at the
    probed noise levels each velocity call also runs ``inner.reference()`` on the same input and
    records ``mean((v − v_base)²)`` per sample. What ``inner`` returns is passed on untouched, so the
    images are those of the plain evaluation."""

    def __init__(self, inner: Backbone, probed_sigmas: Sequence[float]) -> None:
        self.inner = inner
        self.probed = torch.tensor(list(probed_sigmas), dtype=torch.float32)
        self.per_sample: list[torch.Tensor] = []

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return self.inner.encode(prompts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(latents)

    def latent_shape(self) -> tuple[int, ...]:
        return self.inner.latent_shape()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.inner.trainable_parameters()

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def calls_per_velocity(self) -> int:
        return self.inner.calls_per_velocity

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        v = self.inner.velocity(x, sigma, cond)
        if torch.isclose(self.probed, sigma[:1].detach().float().cpu()).any():
            with torch.no_grad(), self.inner.reference():
                v_base = self.inner.velocity(x, sigma, cond)
            self.per_sample.append((v.detach().double() - v_base.double()).pow(2).flatten(1).mean(1).cpu())
        return v

    def mean(self) -> float:
        """The mean drift over every probed (sample, step); NaN before any."""
        return torch.cat(self.per_sample).mean().item() if self.per_sample else float("nan")


# -- the rule ---------------------------------------------------------------------------------------
def roles(rows: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(trained, held-out) reward names of a run's ``metrics.jsonl`` rows: trained rewards have
    ``reward/<name>/mean`` in the training rows, held-out ones only an evaluation."""
    rows = list(rows)
    trained = list(dict.fromkeys(k[len("reward/"):-len("/mean")] for r in rows for k in r
                                 if k.startswith("reward/") and k.endswith("/mean")))
    return trained, [n for n in m.evaluated_rewards(rows) if n not in trained]


def _evaluations(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The evaluation rows (any ``eval/...`` value), one per iteration (the last written: a resumed
    run's repeat), in iteration order."""
    by_iteration: dict[int, Mapping[str, Any]] = {}
    for row in rows:
        if m.ITERATION in row and any(k.startswith("eval/") and _finite(v) for k, v in row.items()):
            by_iteration[int(row[m.ITERATION])] = row
    return [by_iteration[k] for k in sorted(by_iteration)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _change(base: Mapping[str, Any], latest: Mapping[str, Any], mean: str, sem: str) -> tuple[float, float] | None:
    """(latest − base, the standard error of that difference: √(SE_base² + SE_latest²), 0 unknown)."""
    if not (_finite(base.get(mean)) and _finite(latest.get(mean))):
        return None
    errors = [s for s in (base.get(sem), latest.get(sem)) if _finite(s)]
    return latest[mean] - base[mean], math.sqrt(sum(s * s for s in errors))


def _moves(base: Mapping, latest: Mapping, names: Iterable[str], lower_is_better: Collection[str],
           threshold: float, want: int) -> Iterator[tuple[str, str, str, float, float]]:
    """(name, base text, latest text, change, SE) of each reward that moved in direction ``want``
    (+1 better, −1 worse) by more than ``threshold`` standard errors."""
    for name in names:
        change = _change(base, latest, m.evaluation(name, "mean"), m.evaluation(name, "sem"))
        sign = -1 if name in lower_is_better else 1
        if change is not None and want * sign * change[0] > threshold * change[1]:
            yield (name, format_value(base[m.evaluation(name, "mean")]),
                   format_value(latest[m.evaluation(name, "mean")]), *change)


def hacking_signals(rows: Iterable[Mapping[str, Any]], trained: Iterable[str], held_out: Iterable[str], *,
                    lower_is_better: Collection[str] = (), threshold: float = 1.0) -> list[str]:
    """Possible reward hacking between the first evaluation (the base model, iteration 0) and the
    latest one of ``rows`` (``metrics.jsonl`` rows), in words: one sentence per held-out reward, or
    the within-prompt diversity, that fell by more than ``threshold`` standard errors of the
    difference while a trained reward rose by more than ``threshold`` of its own. Empty when no
    trained reward rose, nothing fell, or there are fewer than two evaluations. A reward in
    ``lower_is_better`` rises when its score falls."""
    evaluations = _evaluations(rows)
    if len(evaluations) < 2:
        return []
    base, latest = evaluations[0], evaluations[-1]
    rising = list(_moves(base, latest, trained, lower_is_better, threshold, +1))
    if not rising:
        return []
    falling = [(f"held-out {n}", b, f, d, s)
               for n, b, f, d, s in _moves(base, latest, held_out, lower_is_better, threshold, -1)]
    diversity = _change(base, latest, m.DIVERSITY_MEAN, m.DIVERSITY_SEM)
    if diversity is not None and -diversity[0] > threshold * diversity[1]:
        falling.append(("the within-prompt diversity", format_value(base[m.DIVERSITY_MEAN]),
                        format_value(latest[m.DIVERSITY_MEAN]), *diversity))
    rose = " and ".join(f"trained {n} rose {b} → {f} ({_signed(d)}, SE {format_value(s, 2)})"
                        for n, b, f, d, s in rising)
    span = f"iteration {int(base[m.ITERATION])} → {int(latest[m.ITERATION])}"
    return [f"{what} fell {b} → {f} ({_signed(d)}, more than its SE {format_value(s, 2)}) while {rose}, {span}"
            for what, b, f, d, s in falling]


def _signed(value: float) -> str:
    text = format_value(value)
    return text if text.startswith("-") else "+" + text
