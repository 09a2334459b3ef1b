"""Built-in backbone plugins (flux, sd3, toy) and the models shipped with the package."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_PREFIX = "shipped:"


def resolve_model_path(path: str | Path, what: str = "model") -> Path:
    """A local model folder; ``shipped:NAME`` names a model shipped in the package (``assets/NAME``).

    Nothing is ever downloaded: a path that is not an existing folder is an error that says so and
    how to get one. ``what`` names the model in the message (``"FLUX"``, ``"SD3"``).
    """
    text = str(path)
    if text.startswith(SHIPPED_PREFIX):
        name = text[len(SHIPPED_PREFIX):]
        folder = ASSETS / name
        if not folder.is_dir():
            known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir()) if ASSETS.is_dir() else []
            raise FileNotFoundError(f"no shipped model {name!r}; shipped models: {', '.join(known) or '(none)'}")
        return folder
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} model folder {text!r} does not exist. mixgrpo loads models from local paths only and never "
            "downloads from the Hugging Face Hub: download a diffusers-format snapshot first (e.g. "
            "`huggingface-cli download <repo> --local-dir /models/<name>`) and pass that folder, or "
            "'shipped:NAME' for a model shipped with mixgrpo"
        )
    return folder
