"""The pixel multiple a diffusers backbone's ``height`` and ``width`` must be, read from a model
folder's config files before anything loads.

Each backbone states its own rule in a ``pixel_multiple(path)`` classmethod built from these readers,
so that ``mixgrpo sample --height/--width`` refuses a size it cannot draw in a second rather than after
minutes of loading. A file that is missing or unreadable, a key it lacks, or a transformer of another
class gives None: the caller then leaves the size to the backbone's own check after loading
(``_set_latent_layout``), which stays the authority.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixgrpo.plugins.backbones import resolve_model_path


def model_folder(path: str | Path) -> Path | None:
    """The local model folder ``path`` names (``shipped:NAME`` included), or None when there is none
    (loading the backbone then says what is wrong with it)."""
    try:
        return resolve_model_path(path)
    except FileNotFoundError:
        return None


def read_config(root: Path, name: str) -> dict[str, Any] | None:
    """``root/name/config.json`` as a dict, or None when it is missing or not a JSON object."""
    try:
        config = json.loads((root / name / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def transformer_config(root: Path, expected: str) -> dict[str, Any] | None:
    """The transformer's config when it is a ``expected`` class (or names none); None otherwise, since
    the size rule of another model family would be wrong (loading then names the right backbone)."""
    config = read_config(root, "transformer")
    if config is None or config.get("_class_name", expected) != expected:
        return None
    return config


def vae_downsampling(root: Path) -> int | None:
    """The VAE's spatial downsampling, ``2 ** (len(block_out_channels) - 1)`` (the pipelines'
    ``vae_scale_factor``), or None when ``vae/config.json`` does not say."""
    config = read_config(root, "vae")
    blocks = config.get("block_out_channels") if config else None
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None


def positive_int(value: Any) -> int | None:
    """``value`` when it is a positive integer (a config entry), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

