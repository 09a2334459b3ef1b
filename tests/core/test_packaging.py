"""The package builds without setuptools' deprecation and "package would be ignored" warnings, and its
wheel holds every experiment file and the shipped model."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_builds_without_setuptools_warnings_and_holds_the_data(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "Building wheel for mixgrpo" in log  # the backend's output is in the log we check
    for warning in ("Package would be ignored", "is deprecated", "SetuptoolsDeprecationWarning",
                    "absent from the `packages` configuration"):
        assert warning not in log, warning
    (wheel,) = tmp_path.glob("mixgrpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"mixgrpo/experiments/{p.relative_to(ROOT / 'experiments').as_posix()}"
               for p in (ROOT / "experiments").rglob("*") if p.suffix in (".gin", ".yaml")}
    assets = {f"mixgrpo/plugins/backbones/{p.relative_to(ROOT / 'plugins' / 'backbones').as_posix()}"
              for p in (ROOT / "plugins" / "backbones" / "assets").rglob("*") if p.is_file()}
    assert len(shipped) > 20 and len(assets) >= 6
    assert shipped <= names, sorted(shipped - names)
    assert assets <= names, sorted(assets - names)
