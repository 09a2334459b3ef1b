"""The shipped experiment presets (gin files), importable as ``mixgrpo.experiments`` so that they are
installed with the package: a gin file anywhere on disk can ``include 'methods/mixgrpo.gin'``."""

from pathlib import Path

PRESETS = Path(__file__).resolve().parent
