"""Checkpoints side by side: held-out rewards of several checkpoints and a grid per prompt.

``mixgrpo eval`` and ``mixgrpo compare`` take checkpoints of one run (``base``, ``20``, ``latest``) or
of several runs (a run directory means its latest checkpoint; ``LABEL=`` names a row). Every
checkpoint is evaluated by the trainer's own ``evaluate`` under one config (the same held-out
prompts, seeds, solver and rewards), and drawn for a few prompts and seeds: one PNG per prompt,
rows the checkpoints, columns the seeds, each image captioned with its scores.

A grid image of prompt ``n`` (its position in the prompt list) with seed ``s`` starts from the noise
keyed ``(s, "eval", n)``, as ``sample_ode`` and ``mixgrpo sample`` key it: with the run's sample
prompts and seed, the first column repeats the run's own sample grids, and ``mixgrpo sample`` with
the same prompt list and seeds draws the same images.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from mixgrpo.commands.export import (
    BASE,
    CHECKPOINTS,
    RUN_CONFIG,
    ExportError,
    checkpoint_backbone,
    load_checkpoint_weights,
    resolve_checkpoint,
)
from mixgrpo.commands.report import format_difference, format_estimate, format_value
from mixgrpo.core import checkpoint as ckpt
from mixgrpo.core import metrics
from mixgrpo.core.progress import progress_bar

RESULTS = "results.json"
REPORT = "report.md"
GRID_PROMPTS = 4  # prompts drawn side by side unless --prompts says otherwise
GRID_SEEDS = 4  # seeds (columns) unless --seeds says otherwise
CELL = 128  # a grid cell's longest side in pixels: small images are enlarged by a whole factor


@attrs.define
class Entry:
    """One row of a comparison: a checkpoint (None: the base model) and its label."""

    label: str
    checkpoint: Path | None
    iteration: int
    run: Path | None


def parse_entry(spec: str, run_dir: Path, backbone: str) -> Entry:
    """The checkpoint a ``--checkpoint`` value names, relative to the run ``run_dir``.

    ``[LABEL=]WHAT`` with WHAT: ``base``, ``latest``, an iteration (``20``), a name (``iter_000020``),
    a checkpoint folder, or another run directory (its latest checkpoint). A checkpoint of another
    backbone family is refused here, before any model loads.
    """
    label = None
    head, sep, rest = spec.partition("=")
    if sep and head.strip() and os.sep not in head and not Path(spec).exists():
        label, spec = head.strip(), rest.strip()
    if not spec:
        raise ExportError(f"--checkpoint {label}= names no checkpoint")
    if spec == BASE:
        return Entry(label or "base", None, 0, None)
    path = Path(spec)
    other = path.is_dir() and (path / RUN_CONFIG).is_file() and not (path / ckpt.STATE_FILE).is_file()
    if other:
        found = ckpt.latest(path / CHECKPOINTS)
        if found is None:
            raise ExportError(f"run {path} has no checkpoint ({path / CHECKPOINTS / 'latest'} not found)")
    else:
        found = resolve_checkpoint(spec, run_dir / CHECKPOINTS, allow_base=True)
        if found is None:
            return Entry(label or "base", None, 0, None)
    family = checkpoint_backbone(found)
    if family is not None and family != backbone:
        raise ExportError(f"checkpoint {found} was written by a {family!r} run, but this config trains "
                          f"{backbone!r}: a checkpoint loads only into its own backbone family")
    iteration = int(json.loads((found / ckpt.STATE_FILE).read_text()).get("iteration", 0))
    run = found.parent.parent
    same_run = run.resolve() == run_dir.resolve()
    default = f"iteration {iteration}" if same_run else f"{_run_name(run)} @ {iteration}"
    return Entry(label or default, found, iteration, None if same_run else run)


def _run_name(run: Path) -> str:
    """A run directory as a short label: ``MixGRPO/seed_0`` for a comparison's run, else its name."""
    return f"{run.parent.name}/{run.name}" if run.name.startswith("seed_") else run.name


def parse_entries(specs: Sequence[str] | None, run_dir: Path, backbone: str) -> list[Entry]:
    """Every ``--checkpoint`` value; none given: the latest checkpoint, or the base model without one."""
    if not specs:
        found = ckpt.latest(run_dir / CHECKPOINTS)
        specs = ["latest"] if found is not None else [BASE]
    entries = [parse_entry(s, run_dir, backbone) for s in specs]
    labels = [e.label for e in entries]
    if len(set(labels)) < len(labels):
        twice = sorted({x for x in labels if labels.count(x) > 1})
        raise ExportError(f"two rows would be labelled {twice[0]!r}: name them with LABEL=CHECKPOINT")
    return entries


# -- the grid --------------------------------------------------------------------------------------
def cell_scale(height: int, width: int) -> int:
    """The whole factor a ``height × width`` image is enlarged by in a grid cell (1 for large ones)."""
    return max(1, CELL // max(height, width))


def to_pil(image: torch.Tensor, scale: int = 1) -> Any:
    """An image ``[3, H, W]`` in [0, 1] as an 8-bit PIL image (rounded as ``save_png``), enlarged
    ``scale`` times by pixel repetition."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    pil = Image.fromarray(array)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil


def _fit(text: str, font: Any, width: int) -> str:
    """``text`` cut (with …) to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def compose_grid(images: Sequence[Sequence[torch.Tensor]], row_labels: Sequence[str], column_labels: Sequence[str],
                 captions: Sequence[Sequence[str]], title: str, path: Path) -> dict[str, Any]:
    """Write a PNG of ``images[row][column]`` (each ``[3, H, W]`` in [0, 1]) with row labels on the
    left, column labels on top, a caption under every image and ``title`` above. Images are pasted
    pixel for pixel (enlarged by a whole factor when small, never resampled otherwise). Returns the
    layout: the size, the scale and every cell's box ``[left, top, right, bottom]``."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    height, width = images[0][0].shape[-2:]
    scale = cell_scale(height, width)
    cw, ch = width * scale, height * scale
    pad, line = 6, 14
    left = max(90, min(220, int(max(font.getlength(t) for t in row_labels)) + 2 * pad))
    caption_lines = max(len(c.split("\n")) for row in captions for c in row)
    top = pad + 2 * line + pad
    col_w, row_h = cw + pad, ch + caption_lines * line + 2 * pad
    size = (left + len(column_labels) * col_w + pad, top + len(row_labels) * row_h)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), _fit(title, font, size[0] - 2 * pad), fill="black", font=font)
    boxes = []
    for c, label in enumerate(column_labels):
        draw.text((left + c * col_w, pad + line + 2), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        y = top + r * row_h
        draw.text((pad, y + ch // 2 - line // 2), _fit(label, font, left - 2 * pad), fill="black", font=font)
        row_boxes = []
        for c in range(len(column_labels)):
            x = left + c * col_w
            canvas.paste(to_pil(images[r][c], scale), (x, y))
            for k, text in enumerate(captions[r][c].split("\n")):
                draw.text((x, y + ch + 2 + k * line), _fit(text, font, cw), fill="black", font=font)
            row_boxes.append([x, y, x + cw, y + ch])
        boxes.append(row_boxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return {"size": list(size), "scale": scale, "cells": boxes}


# -- evaluation ------------------------------------------------------------------------------------
def evaluate_entries(trainer: Any, entries: Sequence[Entry], prompts: Sequence[str], seeds: Sequence[int],
                     progress: bool = True, evaluate: bool = True) -> list[dict[str, Any]]:
    """Every entry's held-out evaluation (``trainer.evaluate``, the numbers training reports; skipped
    without ``evaluate``) and its grid images, prompt-major, with their scores. The base model comes
    first, before any checkpoint overwrites the weights; results are in the order of ``entries``."""
    from mixgrpo.commands.sample import sample_images
    from mixgrpo.core.scoring import call_reward

    c = trainer.config
    rewards = {**trainer.rewards, **trainer.eval_only_rewards}
    order = sorted(range(len(entries)), key=lambda k: entries[k].checkpoint is not None)
    pairs = [(n, s) for n in range(len(prompts)) for s in seeds]
    results: dict[int, dict[str, Any]] = {}
    bar = progress_bar(order, desc="checkpoints", unit="ckpt", disable=not progress)
    for k in bar:
        entry = entries[k]
        bar.set_postfix_str(entry.label)
        if entry.checkpoint is not None:
            load_checkpoint_weights(trainer.backbone, entry.checkpoint)
        trainer.backbone.module.eval()
        scores: dict[str, list[float]] = {}
        metrics = trainer.evaluate(scores) if evaluate else {}
        images = sample_images(trainer.backbone, [prompts[n] for n, _ in pairs], [n for n, _ in pairs],
                               [s for _, s in pairs], setup=trainer.eval_setup, solver=trainer.eval_solver,
                               batch_size=c.rollout_batch_size)
        grid_scores = {name: call_reward(reward, name, images, [prompts[n] for n, _ in pairs]).tolist()
                       for name, reward in rewards.items()}
        results[k] = {"entry": entry, "metrics": metrics, "scores": scores, "images": images,
                      "grid_scores": grid_scores}
    return [results[k] for k in range(len(entries))]


def paired(first: list[float], other: list[float]) -> tuple[float, float] | None:
    """Mean and SE of ``other − first`` image by image (the same prompts and seeds)."""
    diffs = [b - a for a, b in zip(first, other) if math.isfinite(a) and math.isfinite(b)]
    if len(first) != len(other) or len(diffs) < 2:
        return None
    m = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1))
    return m, sd / math.sqrt(len(diffs))


def write_side_by_side(out: Path, trainer: Any, results: Sequence[dict[str, Any]], prompts: Sequence[str],
                       seeds: Sequence[int], title: str, source: str) -> dict[str, Any]:
    """``out/report.md`` (the reward table, then the grids), ``out/grid_pNNNN.png`` per prompt and
    ``out/results.json`` (every number, per-image score and grid layout). Returns the results."""
    c = trainer.config
    names = list({**trainer.rewards, **trainer.eval_only_rewards})
    out.mkdir(parents=True, exist_ok=True)
    grids = []
    for n, prompt in enumerate(prompts):
        cells = [[r["images"][n * len(seeds) + j] for j in range(len(seeds))] for r in results]
        scores = {name: [[r["grid_scores"][name][n * len(seeds) + j] for j in range(len(seeds))] for r in results]
                  for name in names}
        captions = [[" ".join(f"{name.split('.')[-1]} {format_value(scores[name][i][j])}" for name in names)
                     for j in range(len(seeds))] for i in range(len(results))]
        file = f"grid_p{n:04d}.png"
        layout = compose_grid(cells, [r["entry"].label for r in results], [f"seed {s}" for s in seeds], captions,
                              prompt, out / file)
        grids.append({"file": file, "prompt": prompt, "prompt_index": n, "seeds": list(seeds),
                      "rows": [r["entry"].label for r in results], "scores": scores, **layout})
    data = {
        "source": source,
        "evaluation": {"prompts": c.eval_prompts, "seeds": c.eval_seeds, "num_steps": trainer.eval_setup.num_steps,
                       "solver": c.eval_solver, "rewards": names, "trained_on": list(trainer.rewards)},
        "checkpoints": [{"label": r["entry"].label,
                         "checkpoint": str(r["entry"].checkpoint) if r["entry"].checkpoint else "base",
                         "iteration": r["entry"].iteration,
                         "run": str(r["entry"].run) if r["entry"].run else None,
                         "metrics": r["metrics"], "scores": r["scores"]} for r in results],
        "grids": grids,
    }
    (out / RESULTS).write_text(json.dumps(data, indent=1) + "\n")
    (out / REPORT).write_text(report_markdown(data, title))
    return data


def table_lines(data: dict[str, Any]) -> list[str]:
    """The reward table: a row per checkpoint, a column per reward (mean ± SE over the held-out
    images), and the paired difference to the first row for every later row."""
    names = data["evaluation"]["rewards"]
    rows = data["checkpoints"]
    head = ["checkpoint", "iteration", *[f"{n}{' (trained)' if n in data['evaluation']['trained_on'] else ''}"
                                         for n in names]]
    if len(rows) > 1:
        head += [f"{n}: paired difference to {rows[0]['label']}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, row in enumerate(rows):
        m = row["metrics"]
        cells = [row["label"], str(row["iteration"]),
                 *[format_estimate(m.get(metrics.evaluation(n, "mean")), m.get(metrics.evaluation(n, "sem")))
                   for n in names]]
        if len(rows) > 1:
            for n in names:
                d = paired(rows[0]["scores"].get(n, []), row["scores"].get(n, [])) if k else None
                cells.append("" if k == 0 else format_difference(*d) if d else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(data: dict[str, Any], title: str) -> str:
    ev = data["evaluation"]
    lines = [f"# {title}", ""]
    if any(row["metrics"] for row in data["checkpoints"]):
        lines += [f"Held-out rewards of `{data['source']}`: {ev['prompts']} evaluation prompts never trained on × "
                  f"{ev['seeds']} sampling seeds, deterministic ODE ({ev['solver']}, {ev['num_steps']} steps); ± is "
                  "the standard error over those images. The paired difference compares the same prompts and seeds "
                  "image by image.", "", *table_lines(data), ""]
    lines += ["## Side by side", "",
             "Rows: checkpoints; columns: sampling seeds; under each image its scores. The same prompt and seed "
             "start from the same noise in every row.", ""]
    for g in data["grids"]:
        lines += [f"**{g['prompt']}**", "", f"![{g['prompt']}]({g['file']})", ""]
    lines.append(f"Every number and per-image score: [`{RESULTS}`]({RESULTS}).")
    return "\n".join(lines) + "\n"


# -- the commands ----------------------------------------------------------------------------------
def grid_prompts_and_seeds(trainer: Any, prompts: str | Sequence[str] | None,
                           seeds: str | Sequence[int] | None) -> tuple[list[str], list[int]]:
    """Grid prompts (default: the first of the run's sample-grid prompts) and seeds (default: the
    run's seed and the next ones)."""
    from mixgrpo.commands.sample import parse_seeds, read_prompts

    c = trainer.config
    if prompts is None:
        prompt_list = trainer.prompt_set("eval", c.sample_prompts, c.seed)[:GRID_PROMPTS]
    else:
        prompt_list = read_prompts(prompts) if isinstance(prompts, str) else [str(p) for p in prompts]
    seed_list = (parse_seeds(seeds) if isinstance(seeds, str) else list(seeds) if seeds is not None
                 else [c.seed + j for j in range(GRID_SEEDS)])
    if not seed_list:
        raise ExportError("no seed given")
    return prompt_list, seed_list


def run_eval(source: str | os.PathLike, checkpoints: Sequence[str] | None = None, out: str | os.PathLike | None = None,
             *, force: bool = False, prompts: str | Sequence[str] | None = None,
             seeds: str | Sequence[int] | None = None, bindings: Sequence[str] = (), output: str | None = None,
             progress: bool = True, title: str | None = None, labels: Sequence[str] | None = None,
             evaluate: bool = True) -> tuple[Path, dict[str, Any]]:
    """Evaluate checkpoints under one run's config; write the report into ``out`` (default:
    ``<run>/eval``). Returns the folder and the results.

    Args:
        source: a run directory (its ``config.gin``) or an experiment gin file (its ``output_dir``,
            or ``output``, is the run).
        checkpoints: ``--checkpoint`` values (see ``parse_entry``); default the latest checkpoint.
        out: the output folder (missing or empty, unless ``force``).
        prompts, seeds: the grid's prompts (a file, a prompt, or a list) and seeds.
        labels: row labels replacing those of ``checkpoints``; evaluate: False draws the grids only.
    """
    from mixgrpo.commands.export import check_output_dir
    from mixgrpo.core.config import load_config
    from mixgrpo.core.trainer import Trainer

    src = Path(source)
    extra = list(bindings)
    if src.is_dir():
        if not (src / RUN_CONFIG).is_file():
            raise ExportError(f"{src} is not a run directory: it has no {RUN_CONFIG}")
        config_file = src / RUN_CONFIG
        extra.append(f"TrainConfig.output_dir = {str(src)!r}")
    elif src.is_file():
        config_file = src
        if output:
            extra.append(f"TrainConfig.output_dir = {str(output)!r}")
    else:
        raise ExportError(f"{src} is neither a run directory nor a gin file")
    if not progress:
        extra.append("TrainConfig.progress = False")
    config, pm = load_config(config_file, extra)
    run_dir = Path(config.output_dir)
    entries = parse_entries(checkpoints, run_dir, config.backbone)
    if labels is not None:
        entries = [attrs.evolve(e, label=label) for e, label in zip(entries, labels, strict=True)]
    target = Path(out) if out is not None else run_dir / "eval"
    check_output_dir(target, force)
    trainer = Trainer(config, pm)
    grid_prompts, grid_seeds = grid_prompts_and_seeds(trainer, prompts, seeds)
    results = evaluate_entries(trainer, entries, grid_prompts, grid_seeds, progress=progress, evaluate=evaluate)
    data = write_side_by_side(target, trainer, results, grid_prompts, grid_seeds,
                              title or f"Held-out evaluation of {run_dir.name}", str(source))
    return target, data


def grid_section(data: dict[str, Any], folder: str) -> list[str]:
    """Markdown of the grids of ``data`` whose files lie in ``folder`` (relative to the report)."""
    lines = []
    for g in data["grids"]:
        lines += [f"**{g['prompt']}**", "", f"![{g['prompt']}]({folder}/{g['file']})", ""]
    return lines


def compare_runs_side_by_side(out: Path, runs: dict[str, list[Path]], progress: bool = True) -> dict[str, Any] | None:
    """The grids of a comparison, in ``out/side_by_side/``: the base model and the final checkpoint
    of every variant's first run, drawn under the first variant's config (the report's table has
    the numbers already, so nothing is evaluated again). None when a variant's run kept no
    checkpoint (``TrainConfig.checkpoint_every = 0``)."""
    firsts = {label: dirs[0] for label, dirs in runs.items() if dirs}
    if not firsts or any(ckpt.latest(d / CHECKPOINTS) is None for d in firsts.values()):
        return None
    first = next(iter(firsts.values()))
    _, data = run_eval(first, ["base", *(str(d) for d in firsts.values())], out / "side_by_side", force=True,
                       progress=progress, title="Side by side", labels=["base", *firsts], evaluate=False)
    return data
