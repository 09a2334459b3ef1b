"""The run directory's ``README.md``: a model card written at the end of a run, to publish as is.

It says what was trained (method, backbone and base model, fine-tuning mode, rewards, budget), how
the model scores on held-out prompts (base and final, with standard errors and the paired gain, read
from ``metrics.jsonl`` and ``eval_scores.jsonl``), shows the held-out curve (``reward_curve.png``)
and the sample grids before and after, tells how to export the weights and load them in diffusers,
and ends with the operative config (``config.gin``), from which the run can be repeated.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from mixgrpo.commands.report import (
    MEASURES,
    format_difference,
    format_estimate,
    held_out_summary,
    measure_lines,
    read_metrics,
    run_signals,
)
from mixgrpo.core import metrics
from mixgrpo.core.interfaces import Backbone, ModelFacts
from mixgrpo.core.records import METRICS

CARD = "README.md"
CURVE = "reward_curve.png"

def method_name(config: Any) -> str:
    """The method a config trains, as the papers name it: the preset's ``TrainConfig.method``, else the
    objective's registered name."""
    return config.method or config.objective


def _panels(rows: list[dict], trained: Any) -> list[tuple[str, str, str | None]]:
    """(label, mean key, SE key) of each curve the card plots: the trained rewards first, then the
    held-out ones, the diversity and the drift from the base, those the run recorded."""
    names = sorted(metrics.evaluated_rewards(rows), key=lambda n: n not in trained)
    panels = [(f"held-out {n}" + (" (trained)" if n in trained else " (not trained)"), metrics.evaluation(n, "mean"),
               metrics.evaluation(n, "sem")) for n in names]
    return panels + [(label, mean, sem) for label, mean, sem in MEASURES if any(mean in r for r in rows)]


def plot_curve(run_dir: Path, path: Path, trained: Any = ()) -> bool:
    """Held-out rewards against iteration, one panel each (mean ± SE; the ``trained`` ones first), and
    beside them the within-prompt diversity and the drift from the base; False without evaluations."""
    rows = read_metrics(run_dir / METRICS) if (run_dir / METRICS).is_file() else []
    panels = _panels(rows, trained) if metrics.evaluated_rewards(rows) else []
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (label, mean, sem) in zip(axes[0], panels):
        points = [(r[metrics.ITERATION], r[mean], (r.get(sem) if sem else 0.0) or 0.0) for r in rows
                  if r.get(mean) is not None]
        xs, ys, es = zip(*points)
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("held-out evaluation (mean ± SE over evaluation prompts and seeds)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def usage_lines(run_dir: Path, config: Any, backbone: Backbone, prompt: str) -> list[str]:
    """How to export the run and load it in diffusers (``Backbone.load_snippet``), or, for a backbone
    no diffusers pipeline loads, how to draw with ``mixgrpo sample``."""
    if not backbone.model_facts().pipeline:
        return [f"The `{config.backbone}` backbone is not a diffusers model, so `mixgrpo export` has nothing to "
                "write for it. Draw images with:", "", "```bash",
                f"mixgrpo sample {run_dir} --prompts \"{prompt}\" --seeds 0-3 --out samples_out", "```"]
    export = f"exported/{run_dir.name}"
    return ["Write the weights the way diffusers loads them:", "", "```bash",
            f"mixgrpo export {run_dir} --to {export}", "```", "",
            *backbone.load_snippet(export, prompt, config.eval_num_steps or config.num_steps)]


def _front_matter(config: Any, backbone: Backbone, facts: ModelFacts) -> list[str]:
    tags = list(dict.fromkeys(["mixgrpo", config.objective, "reinforcement-learning", "text-to-image"]))
    if facts.family:
        tags.append(facts.family)
    if backbone.lora_rank:
        tags.append("lora")
    lines = ["---"]
    if facts.pipeline:
        lines.append("library_name: diffusers")
    lines.append("pipeline_tag: text-to-image")
    base = facts.base_model or ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists():  # a Hub id, not a local folder
        lines.append(f"base_model: {base}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    return [*lines, "---"]


def model_card(run_dir: Path, config: Any, backbone: Backbone, prompt: str = "a red circle") -> str:
    """The card's Markdown (``plot_curve`` draws the curve it shows)."""
    facts = backbone.model_facts()
    rows = read_metrics(run_dir / METRICS) if (run_dir / METRICS).is_file() else []
    iterations = max((int(r["iteration"]) for r in rows), default=0)
    method = method_name(config)
    base = facts.base_model or config.backbone
    mode = (f"LoRA (rank {backbone.lora_rank}, alpha {facts.lora_alpha})" if backbone.lora_rank
            else "full fine-tuning of the transformer")
    rewards = ", ".join(f"`{n}` (weight {w:g})" for n, w in config.rewards.items())
    lines = [*_front_matter(config, backbone, facts), "", f"# {run_dir.name}: {method} on `{base}`", "",
             f"Trained with [mixgrpo](https://arxiv.org/abs/2507.21802)'s {method} recipe: online reinforcement "
             "learning of the GRPO family on a flow-matching text-to-image model.", "",
             "## What was trained", "",
             "| | |", "|---|---|",
             f"| method | {method}: objective `{config.objective}`, window schedule `{config.schedule}`, SDE "
             f"`{config.sde_sampler}`, ODE `{config.pre_solver}` / `{config.post_solver}`"
             + (f", compression {config.compression:g}" if config.compression is not None else "") + " |",
             f"| backbone | `{config.backbone}` ({type(backbone).__name__}), base model `{base}` |",
             f"| fine-tuning | {mode} |",
             f"| rewards | {rewards}"
             + (f"; evaluated only: {', '.join(f'`{n}`' for n in config.eval_rewards)}" if config.eval_rewards else "")
             + " |",
             f"| budget | {iterations} iterations × {config.prompts_per_iteration} prompts × {config.group_size} "
             f"samples, {config.num_steps} steps, learning rate {config.learning_rate:g}, seed {config.seed}, "
             f"prompts `{config.prompt_set}` |", ""]
    summary = held_out_summary(run_dir)
    lines += ["## Held-out evaluation", ""]
    if summary:
        lines += [f"{config.eval_prompts} evaluation prompts never trained on × {config.eval_seeds} sampling seeds, "
                  f"deterministic ODE (`{config.eval_solver}`, {config.eval_num_steps or config.num_steps} steps); ± "
                  "is the standard error over those images. The paired gain is the mean per-image difference "
                  "between the final and the base evaluation (the same prompts and seeds), with its SE.", "",
                  "| reward | trained on | base | final | gain | paired gain |", "|---|---|---|---|---|---|"]
        for s in summary:
            b, f, p = s["base"], s["final"], s["paired_gain"]
            gain = f["mean"] - b["mean"] if s["evaluations"] > 1 else None
            lines.append(
                f"| {s['reward']} | {'yes' if s['reward'] in config.rewards else 'no'} | "
                f"{format_estimate(b['mean'], b['sem'])} (iteration {b['iteration']}) | "
                + (f"{format_estimate(f['mean'], f['sem'])} (iteration {f['iteration']}) | "
                   f"{format_difference(gain, math.hypot(b['sem'] or 0.0, f['sem'] or 0.0))} | " if gain is not None
                   else "n/a | n/a | ")
                + (f"{format_difference(p['mean'], p['sem'])} |" if p else "n/a |"))
        lines += hacking_lines(rows)
        if (run_dir / CURVE).is_file():
            lines += ["", f"![held-out reward]({CURVE})"]
    else:
        lines.append("This run evaluated nothing on held-out prompts (`TrainConfig.eval_every = 0`).")
    grids = sorted((run_dir / "samples").glob("iter_*.png"))
    if grids:
        lines += ["", "## Samples", "",
                  "The same prompts and seeds (the same initial noise) before and after training, each image with "
                  "its scores:", ""]
        for grid in dict.fromkeys([grids[0], grids[-1]]):
            k = int(grid.stem.split("_")[1])
            lines += [f"**iteration {k}**{' (base model)' if k == 0 else ''}", "",
                      f"![iteration {k}](samples/{grid.name})", ""]
    lines += ["", "## Use it", "", *usage_lines(run_dir, config, backbone, prompt), "",
              "Score its latest checkpoint on held-out prompts with every configured reward (a report with "
              "side-by-side grids in `eval/`), or train it further:", "", "```bash", f"mixgrpo eval {run_dir}",
              f"mixgrpo train {run_dir} --resume --gin \"TrainConfig.iterations = {2 * config.iterations}\"", "```",
              "", "## Configuration", "",
              "The operative config of the run (`config.gin`); this repeats the run in a new directory:", "",
              "```bash", f"mixgrpo train {run_dir / 'config.gin'} --output {run_dir}-again", "```", "",
              "<details><summary>config.gin</summary>", "", "```gin"]
    config_text = (run_dir / "config.gin").read_text() if (run_dir / "config.gin").is_file() else ""
    lines += [config_text.rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def hacking_lines(rows: list[dict]) -> list[str]:
    """The card's words on reward hacking: the diversity and the drift from the base, then each sign
    (``hacking.hacking_signals``), or that there was none."""
    measures, signals = measure_lines(rows), run_signals(rows)
    lines = ["", "### Reward hacking", "", "Held-out " + "; ".join(measures) + "." if measures else
             "The run recorded no diversity or drift from the base."]
    if signals:
        return [*lines, "", "**Possible reward hacking**: a trained reward rose while a held-out reward or the "
                "diversity of the images fell by more than its standard error:", "", *[f"- {s}" for s in signals]]
    return [*lines, "", "No sign of reward hacking: no trained reward rose while a held-out reward or the "
            "within-prompt diversity fell by more than its standard error (base → latest evaluation)."]


def write_model_card(run_dir: Path, config: Any, backbone: Backbone, prompt: str = "a red circle") -> Path:
    """Write ``README.md`` (and ``reward_curve.png``) into the run directory; returns the card's path.
    ``prompt`` is the example prompt of the usage snippet."""
    run_dir = Path(run_dir)
    plot_curve(run_dir, run_dir / CURVE, trained=config.rewards)
    path = run_dir / CARD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(model_card(run_dir, config, backbone, prompt))
    tmp.replace(path)
    return path


def write_for(trainer: Any) -> Path | None:
    """The model card of the run ``trainer`` has just trained (the main process writes it; a run
    stopped by a signal gets none until it finishes)."""
    if not trainer.accelerator.is_main_process or trainer.stopped:
        return None
    c = trainer.config
    return write_model_card(trainer.out, c, trainer.backbone, trainer.prompt_set("eval", 1, c.seed)[0])
