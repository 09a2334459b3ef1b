"""benchmarks/gpu.sh end to end on the CPU (tiny architectures): the same script a GPU machine runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .expected import METHODS, PAPER_METHODS, rollout_calls, trained_calls, trained_calls_without_grad

ROOT = Path(__file__).resolve().parents[2]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"
# the newer backbones' entries: (calls per velocity with their recipes' guidance, gradient checkpointing)
NEWER = {"flux2-klein": (2, False), "z-image": (2, False), "sd35-large": (2, False), "qwen-image": (2, True)}
FIELDS = ("iteration_s", "floor_s", "nfe_rollout", "nfe_train", "rollout_s", "reward_s", "train_s",
          "optimizer_s", "peak_mem_gb")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_dry_run")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(GPU_SH), "--device", "cpu", "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.mark.parametrize(("name", "methods"), [("flux-dev", METHODS), ("sd35-medium", PAPER_METHODS)])
def test_json_has_every_method_with_preset_nfe_and_consistent_arithmetic(dry_run, name, methods):
    data = json.loads((dry_run / f"{name}.json").read_text())
    assert set(methods) | {"hardware", "settings", "sweeps"} == set(data)
    s = data["settings"]
    assert s["backbone"] == name and s["tiny"] and s["steps"] == 25 and s["samples"] == 2
    assert s["at_iteration"] == 140  # Flash's window at step 7: 16 rollout steps, its run average
    cfg = 2 if s["cfg_scale"] > 1 else 1  # a guided call evaluates the network twice
    assert cfg == (2 if name == "sd35-medium" else 1)
    dance = data["dancegrpo"]
    for method in methods:
        row = data[method]
        assert all(math.isfinite(row[k]) for k in FIELDS), row
        steps = rollout_calls(method, 25, group_size=2, iteration=140)
        trained = trained_calls(method, 25, group_size=2, groups=1, iteration=140)
        # counted at the network
        assert row["nfe_rollout"] == pytest.approx(steps * cfg), method
        assert row["nfe_train"] == pytest.approx(trained * cfg), method
        # the trainer's own accounting agrees with the backbone's declared calls per velocity
        assert row["trainer_nfe_rollout"] == pytest.approx(steps * s["calls_per_velocity"]), method
        assert row["trainer_nfe_train"] == pytest.approx(trained * s["calls_per_velocity"]), method
        nograd = trained_calls_without_grad(method) * cfg  # priced as forwards in the floor
        assert row["nfe_train_nograd"] == pytest.approx(nograd), method
        # priced at the method's own samples: the run's, or TempFlow-GRPO's trunk group (6 x 24 at T = 25)
        assert row["samples"] == (144 if method == "tempflow_grpo" else s["samples"])
        floor = row["samples"] * ((row["nfe_rollout"] + nograd) * s["per_eval_forward_s"]
                                + (row["nfe_train"] - nograd) * s["per_eval_forward_backward_s"])
        assert row["floor_s"] == pytest.approx(floor, rel=1e-12)
        assert row["ratio_to_dancegrpo"] == pytest.approx(row["iteration_s"] / dance["iteration_s"], rel=1e-12)
        assert row["ratio_to_floor"] == pytest.approx(row["iteration_s"] / row["floor_s"], rel=1e-12)
        assert row["floor_ratio_to_dancegrpo"] == pytest.approx(row["floor_s"] / dance["floor_s"], rel=1e-12)
        assert 0 < row["rollout_s"] + row["reward_s"] + row["train_s"] <= row["iteration_s"] * (1 + 1e-9)
        assert 0 < row["optimizer_s"] <= row["train_s"] and row["skipped_steps"] == 0
    assert data["mixgrpo_flash"]["nfe_rollout"] == (16 - 8 / 2) * cfg  # steps 0..7 once per group of 2
    # fewer rollout steps and fewer trained steps than DanceGRPO: the floors must order accordingly
    assert data["mixgrpo_flash_star"]["floor_s"] < data["mixgrpo_flash"]["floor_s"] < data["mixgrpo"]["floor_s"]
    assert data["mixgrpo"]["floor_s"] < dance["floor_s"] < data["flowgrpo"]["floor_s"]
    if name == "flux-dev":  # the newer presets: all T rollout steps per sample, no shared prefix
        assert [data[m]["nfe_train"] for m in ("flowgrpo_fast", "diffusionnft", "awm")] == [2, 8, 18]
        assert data["flowgrpo_fast"]["floor_s"] < data["diffusionnft"]["floor_s"] < data["awm"]["floor_s"]
        assert all(data[m]["window_start"] == -1 for m in ("diffusionnft", "awm"))  # ODE rollouts
        assert 0 <= data["flowgrpo_fast"]["window_start"] <= 25 // 2 - 2  # drawn in the grid's first half
    hw = data["hardware"]
    assert hw["device"] == "cpu" and hw["torch"] and hw["date"].endswith("UTC") and hw["cpu_cores"] >= 1


def test_flux_sweeps_follow_the_requested_points(dry_run):
    data = json.loads((dry_run / "flux-dev.json").read_text())
    sweeps = data["sweeps"]
    assert sweeps["method"] == "mixgrpo"
    assert [p["value"] for p in sweeps["steps"]] == [12, 25]
    assert [p["value"] for p in sweeps["group_size"]] == [2, 3]
    assert [p["value"] for p in sweeps["resolution"]] == [32, 48]
    assert [p["value"] for p in sweeps["window"]] == [0, 21]
    assert list(sweeps) == ["method", "steps", "window", "resolution", "group_size"]
    for p in sweeps["window"]:  # the run's own window is at step 5: both points are measured
        assert "from" not in p
        assert p["nfe_rollout"] == pytest.approx(rollout_calls("mixgrpo", 25, group_size=2, iteration=25 * p["value"]))
    for p in sweeps["steps"]:
        assert p["nfe_rollout"] == pytest.approx(rollout_calls("mixgrpo", p["value"], group_size=2, iteration=140))
        assert p["nfe_train"] == pytest.approx(trained_calls("mixgrpo", p["value"], group_size=2, groups=1))
    # the run's own setting is the table's row, not a second measurement
    base = next(p for p in sweeps["steps"] if p["value"] == 25)
    assert base["from"] == "table" and base["iteration_s"] == data["mixgrpo"]["iteration_s"]
    for axis in ("steps", "group_size", "resolution"):
        assert all(p["iteration_s"] > 0 for p in sweeps[axis])


def test_log_prints_the_tables_with_the_json_ratios(dry_run):
    log = (dry_run / "gpu.log").read_text()
    blocks = log.split("\nmethod ")[1:]
    # sd35-medium, flux-dev, MixGRPO with the attention backend and compiled, then the newer backbones
    assert len(blocks) == 4 + len(NEWER)
    for block, name, methods in zip(blocks, ["sd35-medium", "flux-dev"], [PAPER_METHODS, METHODS]):
        data = json.loads((dry_run / f"{name}.json").read_text())
        lines = block.splitlines()[1:1 + len(methods)]
        for line in lines:
            cols = line.split()
            row = data[cols[0]]
            x_floor, x_dance, floor_x_dance = cols[9], cols[10], cols[11]
            assert x_floor == f"{row['ratio_to_floor']:.2f}"
            assert x_dance == f"{row['ratio_to_dancegrpo']:.2f}"
            assert floor_x_dance == f"{row['floor_ratio_to_dancegrpo']:.2f}"
        assert [line.split()[0] for line in lines] == list(methods)
    for block in blocks[2:]:  # MixGRPO alone: no DanceGRPO to divide by
        cols = block.splitlines()[1].split()
        assert cols[0] == "mixgrpo" and cols[10] == cols[11] == "-"
    assert "gpu.sh: done in" in log


@pytest.mark.parametrize(("name", "backend", "compile_mode"), [
    ("flux-dev-attention", "_native_flash", "none"),  # the first installed of flash, xformers, _native_flash
    ("flux-dev-compile", None, "all"),
])
def test_speed_options_time_mixgrpo_against_its_row_of_the_table(dry_run, name, backend, compile_mode):
    data = json.loads((dry_run / f"{name}.json").read_text())
    table = json.loads((dry_run / "flux-dev.json").read_text())
    assert {"mixgrpo", "hardware", "settings", "sweeps"} == set(data)
    s = data["settings"]
    assert (s["methods"], s["attention_backend"], s["compile"]) == (["mixgrpo"], backend, compile_mode)
    assert table["settings"]["compile"] == "none" and table["settings"]["attention_backend"] is None
    row, off = data["mixgrpo"], table["mixgrpo"]
    assert all(math.isfinite(row[k]) for k in FIELDS), row
    # the same work: NFE counted at the network, options on and off
    assert (row["nfe_rollout"], row["nfe_train"]) == (off["nfe_rollout"], off["nfe_train"])
    assert row["nfe_rollout"] == pytest.approx(rollout_calls("mixgrpo", 25, group_size=2, iteration=140))
    assert row["nfe_train"] == pytest.approx(trained_calls("mixgrpo", 25, group_size=2, groups=1))
    assert row["ratio_to_dancegrpo"] is None and row["skipped_steps"] == 0


@pytest.mark.parametrize("name", list(NEWER))
def test_newer_backbones_roll_out_and_train_lora_through_their_own_backbones(dry_run, name, archs):
    """FLUX.2-klein, Z-Image, SD3.5-Large and Qwen-Image: MixGRPO's rollout and a LoRA training step
    through each family's backbone, with the network evaluations its guidance and the preset predict."""
    data = json.loads((dry_run / f"{name}.json").read_text())
    assert {"mixgrpo", "hardware", "settings", "sweeps"} == set(data)
    s, row = data["settings"], data["mixgrpo"]
    calls, checkpointing = NEWER[name]
    assert (s["backbone"], s["tiny"], s["methods"], s["warmup"]) == (name, True, ["mixgrpo"], 0)
    assert s["architecture"] == archs.ARCHS[name] and s["lora_rank"] == 4  # the dry run's rank
    assert s["parameters"] == archs.count_parameters(archs.load_arch(name, tiny=True))
    assert s["gradient_checkpointing"] is checkpointing and s["calls_per_velocity"] == calls
    assert all(math.isfinite(row[k]) for k in FIELDS), row
    assert row["nfe_rollout"] == pytest.approx(calls * rollout_calls("mixgrpo", 25, group_size=2, iteration=140))
    assert row["nfe_train"] == pytest.approx(calls * trained_calls("mixgrpo", 25, group_size=2, groups=1))
    assert row["trainer_nfe_train"] == pytest.approx(row["nfe_train"]) and row["skipped_steps"] == 0
    assert 0 < row["optimizer_s"] <= row["train_s"] and row["window_start"] == 5
