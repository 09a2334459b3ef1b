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


def _fake_install(tmp_path: Path, package: Path = TEMPLATE) -> dict:
    """The environment of a subprocess that sees ``package`` (an examples/ folder) as installed."""
    meta = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    dist = tmp_path / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = ["[mixgrpo]"] + [f"{k} = {v}" for k, v in meta["entry-points"]["mixgrpo"].items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(package / "src"), env.get("PYTHONPATH", "")])
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


def test_a_forward_process_method_from_a_third_party_package_trains(tmp_path):
    """examples/awm-plugin (AWM against the public API only) installs and trains with no change to
    the repository: `mixgrpo plugins` lists it, and two iterations of `mixgrpo train` run on-policy."""
    env = _fake_install(tmp_path, ROOT / "examples" / "awm-plugin")
    out = subprocess.run([sys.executable, "-m", "mixgrpo", "plugins", "--json"], env=env,
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["failures"] == []
    assert data["components"]["objective"]["example.awm"]["origin"] == "mixgrpo-awm 0.1.0"
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mixgrpo", "train", str(ROOT / "experiments" / "runs" / "toy_smoke.gin"),
           "--output", str(run), "--gin", "TrainConfig.objective = 'example.awm'",
           "--gin", "TrainConfig.schedule = 'ode'", "--gin", "TrainConfig.shared_noise = False",
           "--gin", "TrainConfig.iterations = 2", "--gin", "TrainConfig.progress = False",
           "--gin", "ExampleAWM.num_timesteps = 3"]
    subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:
        assert row["policy/onpolicy_ratio_dev"] < 1e-6
        assert row["perf/nfe_train"] == 2 * 3  # K = 3 draws: before the update and with grad
