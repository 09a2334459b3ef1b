"""The example third-party package registers through its entry point, as any plugin would.

Instead of pip-installing it into the shared test environment, the test puts the package and a
``*.dist-info`` folder holding its entry points on PYTHONPATH of a subprocess: importlib.metadata
then finds it exactly as it finds an installed distribution.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples" / "plugin-template"


def _fake_install(tmp_path: Path) -> dict:
    meta = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())["project"]
    dist = tmp_path / f"mixgrpo_template-{meta['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = ["[mixgrpo]"] + [f"{k} = {v}" for k, v in meta["entry-points"]["mixgrpo"].items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(TEMPLATE / "src"), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_template_plugin_appears_in_mixgrpo_plugins(tmp_path):
    env = _fake_install(tmp_path)
    out = subprocess.run([sys.executable, "-m", "mixgrpo", "plugins", "--json"], env=env,
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["failures"] == []
    sampler = data["components"]["sampler"]["template.linear"]
    reward = data["components"]["reward"]["template.brightness"]
    assert sampler["origin"] == reward["origin"] == "mixgrpo-template 0.1.0"
    assert sampler["class"] == "LinearNoiseSDE"
    assert "sde.flow" in data["components"]["sampler"]  # the built-ins are still there


def test_template_components_are_selectable_from_gin(tmp_path):
    env = _fake_install(tmp_path)
    gin_file = tmp_path / "exp.gin"
    gin_file.write_text(
        f"include '{ROOT / 'experiments' / 'runs' / 'toy_smoke.gin'}'\n"
        "TrainConfig.sde_sampler = 'template.linear'\n"
        "LinearNoiseSDE.noise_level = 0.25\n"
        "TrainConfig.rewards = {'template.brightness': 1.0}\n"
    )
    code = (
        "from mixgrpo.core.config import load_config\n"
        f"cfg, pm = load_config({str(gin_file)!r})\n"
        "s = pm.create('sampler', cfg.sde_sampler)\n"
        "r = pm.create('reward', 'template.brightness')\n"
        "print(type(s).__name__, s.noise_level, r.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["LinearNoiseSDE", "0.25", "template.brightness"]
