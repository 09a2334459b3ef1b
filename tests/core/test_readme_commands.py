"""The README's FLUX.1-dev and SD3.5 training commands, run as the README writes them: the command is read
out of README.md (so the two cannot drift), its model, prompt and reward paths are replaced by tiny local
snapshots in the layouts the real ones have (diffusers' ``save_pretrained`` pipeline folders, the published
reward checkpoints), a few ``--gin`` size overrides are appended, and the real CLI trains in a subprocess.

What is not as written: the launcher. ``accelerate launch --config_file <yaml>`` asks for 8 GPUs; here the
CLI arguments after ``-m mixgrpo`` run in one CPU process (the launch configs themselves are
checked to exist and to name the parallelism the README says; FSDP and DDP on two processes are tested in
test_fsdp.py and test_distributed.py). HPS-v2.1 needs open_clip and torchvision: the subprocess makes the
CPU torchvision of ``make test`` importable first (tests/plugins/reward_refs.py), as a GPU machine's
install does; nothing else runs before the CLI's ``main``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

PROMPTS = ["a red circle", "two blue squares", "a green star left of a red ring"]
# appended to the README command: sizes for seconds on a CPU, nothing else
SIZES = ["TrainConfig.iterations = 2", "TrainConfig.num_steps = 4", "TrainConfig.prompts_per_iteration = 2",
         "TrainConfig.group_size = 2", "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 2",
         "TrainConfig.num_minibatches = 1", "TrainConfig.eval_every = 0", "TrainConfig.eval_prompts = 2",
         "TrainConfig.eval_num_steps = 4", "TrainConfig.sample_every = 0", "TrainConfig.checkpoint_every = 1",
         "TrainConfig.progress = False", "TrainConfig.tensorboard = False"]
RUN_CLI = ("import sys; sys.path.insert(0, {root!r}); from tests.plugins.reward_refs import load_torchvision; "
           "load_torchvision(); from mixgrpo.commands.cli import main; sys.exit(main(sys.argv[1:]))")


def readme_command(config: str) -> tuple[list[str], list[str]]:
    """The README's ``accelerate launch`` command that trains ``config``: (launcher, CLI arguments)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = [" ".join(b.replace("\\\n", " ").split()) for b in blocks]
    found = [c for c in commands if c.startswith("accelerate launch") and f" {config} " in c]
    assert len(found) == 1, f"README.md has {len(found)} commands training {config}"
    words = shlex.split(found[0])
    cut = words.index("-m") + 2  # the launcher ends with the module it runs
    return words[:cut], words[cut:]


def substitute(args: list[str], paths: dict[str, Path]) -> list[str]:
    """``args`` with the value of every ``--gin "MACRO = '...'"`` replaced by ``paths[MACRO]``; every path
    the README names must be one of them."""
    out, seen = [], set()
    for word in args:
        m = re.fullmatch(r"(\w+) = '(.*)'", word)
        if m and out and out[-1] == "--gin":
            assert m.group(1) in paths, f"the README binds {m.group(1)}, which this test does not provide"
            seen.add(m.group(1))
            word = f"{m.group(1)} = '{paths[m.group(1)]}'"
        out.append(word)
    assert seen == set(paths), f"README binds {sorted(seen)}, the test provides {sorted(paths)}"
    return out


def check_launcher(launcher: list[str], distributed_type: str) -> None:
    assert launcher[:3] == ["accelerate", "launch", "--config_file"] and launcher[-2:] == ["-m", "mixgrpo"]
    config = yaml.safe_load((ROOT / launcher[3]).read_text())
    assert config["distributed_type"] == distributed_type


def train(tmp: Path, args: list[str], run: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", RUN_CLI.format(root=str(ROOT)), *args,
           *sum((["--gin", b] for b in SIZES), []), "--output", str(run)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr
    return out


def check_run(run: Path, rewards: list[str]) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        for name in rewards:
            assert r[f"reward/{name}/failed"] == 0 and isinstance(r[f"reward/{name}/mean"], float)
        assert r["perf/nfe_rollout"] > 0
    checkpoint = run / "checkpoints" / "iter_000002"
    assert (checkpoint / "model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == checkpoint.name


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Prompt files and the reward checkpoints, in the published layouts (as test_reward_recipes.py)."""
    from tests.plugins.reward_refs import make_tiny_clip, make_tiny_hps, make_tiny_imagereward

    root = tmp_path_factory.mktemp("local")
    (root / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "test.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    hps_ckpt, hps_config = make_tiny_hps(root / "hps", seed=5)
    with pytest.MonkeyPatch.context() as mp:
        ir_ckpt, med, tok, _ = make_tiny_imagereward(root / "imagereward", seed=7, monkeypatch=mp)
    paths = {"PROMPTS_TRAIN": root / "train.txt", "PROMPTS_TEST": root / "test.txt",
             "HPS_CHECKPOINT": hps_ckpt, "PICKSCORE_PATH": make_tiny_clip(root / "pickscore", seed=6),
             "IMAGEREWARD_CHECKPOINT": ir_ckpt, "IMAGEREWARD_MED_CONFIG": med, "BERT_TOKENIZER_PATH": tok}
    # the tiny reward models' structure (the recipe's defaults describe ViT-H-14 and BLIP's ViT-L)
    structure = [f"HPSv2Reward.architecture = '{hps_config}'", "ImageRewardReward.vision_heads = 2"]
    return root, paths, structure


def test_readme_flux_command_trains_from_a_local_snapshot(local, tmp_path):
    from mixgrpo.plugins.backbones.tiny import build_tiny_flux

    root, paths, structure = local
    launcher, args = readme_command("experiments/flux_mixgrpo.gin")
    check_launcher(launcher, "FSDP")
    flux = build_tiny_flux(tmp_path / "FLUX.1-dev", snapshot=True)
    assert (flux / "model_index.json").is_file() and (flux / "scheduler").is_dir()
    paths = {**paths, "FLUX_PATH": flux}
    sizes = ["FluxBackbone.height = 32", "FluxBackbone.width = 32", "FluxBackbone.max_sequence_length = 16",
             "FluxBackbone.gradient_checkpointing = False"]
    args = substitute(args, paths) + sum((["--gin", b] for b in structure + sizes), [])
    run = tmp_path / "run"
    out = train(tmp_path, args, run)
    assert f"run directory: {run}  (at iteration 2 of 2; 2 trained)" in out.stdout
    check_run(run, ["hpsv2", "pickscore", "imagereward"])
    # the summary names each trained reward's last value, and nothing else as a last-iteration value
    last = [line.split(" = ")[0].strip() for line in out.stdout.splitlines() if line.endswith("(last iteration)")]
    assert last == [f"reward/{name}/mean" for name in ("hpsv2", "pickscore", "imagereward")]


def test_readme_sd3_command_trains_from_a_local_snapshot(local, tmp_path):
    from mixgrpo.plugins.backbones.tiny import build_tiny_sd3

    root, paths, _ = local
    launcher, args = readme_command("experiments/flowgrpo_sd3.gin")
    check_launcher(launcher, "MULTI_GPU")
    sd3 = build_tiny_sd3(tmp_path / "stable-diffusion-3.5-medium", snapshot=True)
    assert (sd3 / "model_index.json").is_file() and (sd3 / "scheduler").is_dir()
    paths = {"SD3_PATH": sd3, "PROMPTS_TRAIN": paths["PROMPTS_TRAIN"], "PROMPTS_TEST": paths["PROMPTS_TEST"],
             "PICKSCORE_PATH": paths["PICKSCORE_PATH"]}
    sizes = ["SD3Backbone.height = 32", "SD3Backbone.width = 32", "SD3Backbone.max_sequence_length = 16",
             "SD3Backbone.lora_rank = 4", "SD3Backbone.lora_alpha = 8"]
    args = substitute(args, paths) + sum((["--gin", b] for b in sizes), [])
    run = tmp_path / "run"
    out = train(tmp_path, args, run)
    assert f"run directory: {run}  (at iteration 2 of 2; 2 trained)" in out.stdout
    check_run(run, ["pickscore"])
