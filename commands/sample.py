"""``mixgrpo sample``: images of a run (or of a config's base model) for a list of prompts.

The initial noise of prompt ``n`` (its 0-based index in the prompt list) with seed ``s`` is keyed by
``(s, "eval", n)``, exactly as ``sample_ode`` keys it for the trainer's sample grids. So the same
prompt list and seeds give the same noise for every checkpoint, and a folder of images drawn before
training pairs up file by file with one drawn after it.

An editing backbone (``Backbone.uses_source_images``) draws from edits, an instruction with its source
image each (``EditPrompt``), read from the files the ``edit`` prompt set reads: a JSONL file of
``{"image": ..., "instruction": ...}`` lines or a folder of images with same-named ``.txt``
instructions. ``--height``/``--width`` draw at another size than the config's; on FLUX's dynamic σ grid
the grid's ``mu`` then follows the size as the diffusers pipeline's does (``Backbone.pipeline_mu``). A
size the model cannot draw is refused before it loads where its folder's config files say what it
needs (the backbone's ``pixel_multiple``), else by the backbone once loaded.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixgrpo.commands.export import RUN_CONFIG, ExportError, check_output_dir, open_model
from mixgrpo.core.edits import LINE_FORMAT, read_edits
from mixgrpo.core.interfaces import Backbone, Sampler
from mixgrpo.core.plugins import make_sampler
from mixgrpo.core.progress import progress_bar
from mixgrpo.core.rollout import SamplingSetup, sample_ode
from mixgrpo.core.types import EditPrompt

MANIFEST = "samples.json"
GRID = "grid.png"
GRID_MAX = 64  # images drawn in grid.png (all of them are written as PNGs)


def image_name(index: int, seed: int) -> str:
    """The file of prompt ``index`` (0-based, blank lines of a prompt file skipped) drawn with ``seed``."""
    return f"p{index:04d}_s{seed}.png"


def parse_seeds(text: str) -> list[int]:
    """``"0"``, ``"0,3,7"``, ``"0-3"`` (inclusive) or a mix (``"0-3,10"``) → distinct seeds in order."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        if span:
            lo, hi = int(span.group(1)), int(span.group(2))
            if hi < lo:
                raise ExportError(f"seed range {part!r} runs backwards")
            seeds += range(lo, hi + 1)
        elif re.fullmatch(r"\d+", part):
            seeds.append(int(part))
        else:
            raise ExportError(f"--seeds takes non-negative integers and ranges like 0,3,7 or 0-3, not {text!r}")
    return list(dict.fromkeys(seeds))


def holds_edits(path: Path) -> bool:
    """Whether ``path`` is a file of edits (a ``.jsonl`` file, or a file whose first line is a JSON
    object) or a folder (of source images with their instructions) rather than a text file of prompts."""
    if path.is_dir():
        return True
    if path.suffix.lower() == ".jsonl":
        return True
    with path.open(errors="replace") as lines:
        first = next((line.strip() for line in lines if line.strip()), "")
    return first.startswith("{")


def read_edit_prompts(path: Path) -> list[EditPrompt]:
    """The edits of a JSONL file or a folder, read (and every source image checked) by the ``edit``
    prompt set's own reader, so that ``sample`` takes exactly the files training takes."""
    try:
        edits = read_edits(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(str(exc)) from None
    if not edits:
        raise ExportError(f"{path} holds no edit; give a JSONL file of {LINE_FORMAT} lines or a folder of "
                          f"images with same-named .txt instructions")
    return edits


def read_prompts(spec: str) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or ``spec`` itself as one prompt;
    edits (``EditPrompt`` items) from a JSONL file or a folder (``holds_edits``)."""
    path = Path(spec)
    if path.exists() and holds_edits(path):
        return read_edit_prompts(path)
    if path.is_file():
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ExportError(f"prompt file {path} holds no prompt")
        return prompts
    if spec.endswith((".txt", ".lst")) or os.sep in spec.strip():
        raise ExportError(f"prompt file {spec} not found (a prompt given as text has no path separator or .txt)")
    if not spec.strip():
        raise ExportError("the prompt is empty")
    return [spec.strip()]


def check_prompts_fit(backbone: str, uses_source_images: bool, prompts: Sequence[str], spec: str) -> None:
    """An error unless the prompts are what the backbone draws from: edits (``EditPrompt``) for an
    editing backbone (``Backbone.uses_source_images``), plain text for any other. ``spec`` says where
    the prompts came from, for the message."""
    plain = [p for p in prompts if not isinstance(p, EditPrompt)]
    if uses_source_images and plain:
        raise ExportError(f"backbone {backbone!r} edits a source image, but the prompt {str(plain[0])!r} of {spec} "
                          f"carries none: pass --prompts a JSONL file of edits, one a line, e.g. {LINE_FORMAT} "
                          f"(a relative image path is relative to the file's folder), or a folder of source "
                          f"images, each with its instruction in a .txt file of the same name")
    if not uses_source_images and len(plain) < len(prompts):
        raise ExportError(f"backbone {backbone!r} does not take source images, but {spec} holds edits (an "
                          f"instruction with a source image each): pass plain prompts (a text file, one prompt a "
                          f"line, or one prompt as text), or sample a run of an editing backbone")


def _prompts_name(prompts: str | Sequence[str]) -> str:
    if not isinstance(prompts, str):
        return "the prompt list"
    return str(prompts) if Path(prompts).exists() else "--prompts"


def _check_size(height: int | None, width: int | None) -> None:
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ExportError(f"{flag} must be a positive number of pixels, got {value!r}")


def _bound_model_path(gin_name: str) -> str | None:
    """The ``path`` the parsed config binds for the backbone ``gin_name`` (through its macros), or None
    where it binds none or something else than a string (a ``@call()``, left for loading to run)."""
    import gin

    try:
        value = gin.query_parameter(f"{gin_name}.path")
        for _ in range(32):  # a macro may name another macro
            if not (isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro"):
                break
            value = gin.query_parameter(f"%{value.scoped_selector.rsplit('/', 1)[0]}")
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _check_multiple(backbone: str, gin_name: str, factory: Any, size: dict[str, int]) -> None:
    """Refuse before the model loads a size that is not a multiple of what the backbone draws: its
    ``pixel_multiple(path)`` classmethod reads that from the model folder's config files (e.g. FLUX's
    ``vae/`` and ``transformer/`` configs: the VAE's 8× downsampling, then 2×2 patches, so 16). A
    backbone without one, or a folder whose files do not say, leaves the size to the check the
    backbone makes after loading."""
    declared = isinstance(factory, type) and issubclass(factory, Backbone)
    path = _bound_model_path(gin_name) if declared else None
    multiple = factory.pixel_multiple(path) if path is not None else None
    if not multiple:
        return
    for name, value in size.items():
        if value % multiple:
            below = value // multiple * multiple
            nearest = " or ".join(str(n) for n in (below, below + multiple) if n > 0)
            raise ExportError(f"--{name} {value} is not a multiple of {multiple}: backbone {backbone!r} draws images "
                              f"whose height and width are multiples of {multiple} pixels (the model in {path}, "
                              f"from its config files); pass --{name} {nearest}")


def _preflight(source: str | os.PathLike, bindings: Sequence[str], prompts: Sequence[str], spec: str,
               height: int | None, width: int | None) -> list[str]:
    """What can be checked before the model loads, from the config alone: the prompts fit the
    backbone's registered class (``Backbone.uses_source_images``), the backbone takes the size (a
    ``height``/``width`` constructor argument), and the size is a multiple of what the model draws
    where its folder's config files say (``_check_multiple``). Returns the gin bindings that set the size."""
    from mixgrpo.core.config import load_config

    src = Path(source)
    config_file = src / RUN_CONFIG if src.is_dir() else src
    if not config_file.is_file():
        return []  # open_model says what is wrong with the source
    config, pm = load_config(config_file, bindings)
    entry = pm.get("backbone", config.backbone)
    factory = entry.factory
    if isinstance(factory, type) and issubclass(factory, Backbone):
        check_prompts_fit(config.backbone, factory.uses_source_images, prompts, spec)
    size = {name: value for name, value in (("height", height), ("width", width)) if value is not None}
    if not size:
        return []
    takes = inspect.signature(factory.__init__ if isinstance(factory, type) else factory).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values())
    missing = [name for name in size if name not in takes]
    if missing and not open_ended:
        raise ExportError(f"backbone {config.backbone!r} ({entry.gin_name}) has no {' or '.join(missing)} setting (its "
                          f"constructor takes none): it draws at one size, so --height and --width do not apply")
    _check_multiple(config.backbone, entry.gin_name, factory, size)
    return [f"{entry.gin_name}.{name} = {value}" for name, value in size.items()]


def set_guidance(backbone: Backbone, guidance: float) -> str:
    """Set the guidance the way diffusers' ``guidance_scale`` means it (``Backbone.set_guidance``: e.g.
    the embedded guidance of a guidance-distilled model, else classifier-free guidance). Returns the
    name of the setting changed; a backbone without one is an ``ExportError``."""
    try:
        return backbone.set_guidance(float(guidance))
    except ValueError as exc:
        raise ExportError(str(exc)) from None


@torch.no_grad()
def sample_images(backbone: Backbone, prompts: Sequence[str], indices: Sequence[int], seeds: Sequence[int], *,
                  setup: SamplingSetup, solver: Sampler, batch_size: int = 16) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] of ``prompts[k]`` as prompt ``indices[k]`` with ``seeds[k]``:
    ``sample_ode`` with the noise keyed by the prompt's index in the whole list."""
    return sample_ode(backbone, prompts, seeds, setup=setup, solver=solver, batch_size=batch_size,
                      indices=indices).cpu()


def _check_ode(name: str, stochastic: bool) -> None:
    """An error when the sampler ``name`` is an SDE sampler (``Sampler.stochastic``)."""
    if stochastic:
        raise ExportError(f"sampler {name!r} is stochastic; sample draws with an ODE solver (e.g. euler)")


def save_png(image: torch.Tensor, path: Path) -> None:
    """One image ``[3, H, W]`` in [0, 1] as an 8-bit PNG (rounded as diffusers' ``numpy_to_pil``)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(path)


def run_sample(source: str | os.PathLike, prompts: str | Sequence[str], out: str | os.PathLike, *,
               checkpoint: str | None = None, seeds: str | Sequence[int] | None = None, steps: int | None = None,
               solver: str | None = None, guidance: float | None = None, shift: float | None = None,
               batch_size: int | None = None, height: int | None = None, width: int | None = None,
               bindings: Sequence[str] = (), force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Draw every (prompt, seed) pair with a run's (or a config's) model into the folder ``out``.

    Args:
        source: a run directory or a gin file (see ``open_model``).
        prompts: a prompt file, one prompt as text, a JSONL file or folder of edits (``read_prompts``),
            or a list of prompts (``EditPrompt`` items for an editing backbone).
        out: the output folder (missing or empty, unless ``force``).
        checkpoint: ``latest`` (a run's default), ``base``, an iteration, a name or a folder.
        seeds: a ``parse_seeds`` string or integers (default: the config's seed, that of its grids).
        steps, solver, guidance, shift: override the run's sampling setup (``num_steps``,
            ``eval_solver``, guidance as ``set_guidance`` reads it, ``shift``).
        batch_size: images per model call (default: the config's ``rollout_batch_size``).
        height, width: the image size in pixels (default: the config's), bound as the backbone's
            ``height``/``width`` arguments; a dynamic σ grid then takes the ``mu`` the backbone's
            pipeline uses at that size (``Backbone.pipeline_mu``).
        bindings: extra gin bindings.
        force: write into a non-empty ``out`` (files of the same names are replaced).
        progress: show a progress bar.
    Returns:
        The manifest written to ``out/samples.json``.
    """
    out = Path(out)
    check_output_dir(out, force)
    prompt_list = (read_prompts(prompts) if isinstance(prompts, str)
                   else [p if isinstance(p, EditPrompt) else str(p) for p in prompts])
    if not prompt_list:
        raise ExportError("no prompt given")
    _check_size(height, width)
    if steps is not None and steps < 1:
        raise ExportError(f"--steps must be >= 1, got {steps}")
    if batch_size is not None and batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    if solver is not None:  # a bad solver fails before the model loads
        from mixgrpo.core.plugins import get_plugin_manager

        factory = get_plugin_manager().get("sampler", solver).factory
        if isinstance(factory, type) and issubclass(factory, Sampler):
            _check_ode(solver, factory.stochastic)
    spec = _prompts_name(prompts)
    size_bindings = _preflight(source, bindings, prompt_list, spec, height, width)
    opened = open_model(source, checkpoint, [*bindings, *size_bindings])
    c, backbone = opened.config, opened.backbone
    check_prompts_fit(c.backbone, backbone.uses_source_images, prompt_list, spec)  # a factory that is no class
    seed_list = parse_seeds(seeds) if isinstance(seeds, str) else list(seeds) if seeds is not None else [c.seed]
    if not seed_list:
        raise ExportError("no seed given")
    solver_name = solver or c.eval_solver
    ode = make_sampler(opened.pm, "eval", solver_name)
    _check_ode(solver_name, ode.stochastic)
    if guidance is not None:
        set_guidance(backbone, guidance)
    num_steps = steps or c.num_steps
    mu = c.mu
    if size_bindings and c.grid == "dynamic":  # the grid's shift follows the image size, as the pipeline's does
        mu = backbone.pipeline_mu(num_steps)
        if mu is None:
            raise ExportError(f"TrainConfig.grid = 'dynamic' with TrainConfig.mu = {c.mu} is the grid of the config's "
                              f"image size, and backbone {c.backbone!r} does not say how its pipeline's mu follows "
                              f"the size (Backbone.pipeline_mu): sample at the config's size, or bind the grid for "
                              f"this one, e.g. --gin \"TrainConfig.grid = 'static'\"")
    setup = SamplingSetup(num_steps=num_steps, shift=c.shift if shift is None else shift, grid=c.grid,
                          mu=mu, shift_terminal=c.shift_terminal, shared_noise=False)
    setup.sigmas(None)  # a bad grid fails before any image is drawn
    batch = batch_size or c.rollout_batch_size
    pairs = [(n, s) for n in range(len(prompt_list)) for s in seed_list]  # prompt-major: a prompt's seeds together

    out.mkdir(parents=True, exist_ok=True)  # images are written as they come: an interrupted run keeps them
    grid_images: list[torch.Tensor] = []
    grid_captions: list[str] = []
    entries = []
    bar = progress_bar(total=len(pairs), desc="sampling", unit="img", disable=not progress)
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        images = sample_images(backbone, [prompt_list[n] for n, _ in chunk], [n for n, _ in chunk],
                               [s for _, s in chunk], setup=setup, solver=ode, batch_size=batch)
        for (n, s), image in zip(chunk, images, strict=True):
            name = image_name(n, s)
            save_png(image, out / name)
            prompt = prompt_list[n]
            entry = {"file": name, "prompt_index": n, "seed": s, "prompt": str(prompt)}
            if isinstance(prompt, EditPrompt):
                entry["source_image"] = prompt.image
            entries.append(entry)
            if len(grid_images) < GRID_MAX:
                grid_images.append(image)
                edited = f", editing {Path(prompt.image).name}" if isinstance(prompt, EditPrompt) else ""
                grid_captions.append(f"{prompt} (seed {s}{edited})")
        bar.update(len(chunk))
    bar.close()
    from mixgrpo.commands.report import save_sample_grid  # matplotlib loads only here

    columns = len(seed_list) if 1 < len(seed_list) <= 8 else 4
    save_sample_grid(torch.stack(grid_images), grid_captions, out / GRID, columns=columns)
    guidance_used = dict(backbone.model_facts().guidance_settings)
    manifest = {
        "source": str(source),
        "checkpoint": str(opened.checkpoint) if opened.checkpoint is not None else "base",
        "iteration": opened.iteration,
        "backbone": c.backbone,
        "sampling": {"num_steps": setup.num_steps, "shift": setup.shift, "grid": setup.grid, "mu": setup.mu,
                     "solver": solver_name, "height": int(grid_images[0].shape[-2]),
                     "width": int(grid_images[0].shape[-1]),
                     "sigmas": [round(float(s), 6) for s in setup.sigmas(None)], **guidance_used,
                     "noise_key": "(seed, 'eval', prompt_index)"},
        "seeds": seed_list,
        "images": entries,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
