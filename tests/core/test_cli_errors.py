"""Bad input as a user types it: `mixgrpo train` exits 2 with one error that names the problem and the
fix, no traceback, and (for settings that need no model) before any model loads."""

from __future__ import annotations

import pytest

from mixgrpo.commands.cli import main
from mixgrpo.core.plugins import PluginManager

from .conftest import ROOT, TOY

MIXGRPO = str(ROOT / "experiments" / "methods" / "mixgrpo.gin")
NO_MODEL = "FluxBackbone.path = '/nonexistent/flux'"  # any model load would fail with another message


def train(capsys, config: str, *bindings: str, output=None) -> tuple[int, str]:
    args = ["train", config, *sum((["--gin", b] for b in bindings), [])]
    if output is not None:
        args += ["--output", str(output)]
    rc = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.strip().splitlines()[-1] if err.strip() else ""


@pytest.mark.parametrize("binding, expected", [
    ("TrainConfig.objective = 'mixgrp'", "unknown objective 'mixgrp'; known objectives: "
                                         f"{', '.join(sorted(PluginManager().names('objective')))}. "
                                         "Did you mean 'mixgrpo'?"),
    ("TrainConfig.sde_sampler = 'sde.flw'", "Did you mean 'sde.flow'?"),
])
def test_unknown_plugin_names_the_closest(capsys, binding, expected):
    rc, err = train(capsys, MIXGRPO, *TOY, binding)
    assert rc == 2 and expected in err


def test_misspelled_binding_names_the_parameter(capsys):
    rc, _ = train(capsys, MIXGRPO, *TOY, "TrainConfig.grup_size = 3")
    assert rc == 2


def test_misspelled_binding_message(capsys):
    main(["train", MIXGRPO, "--gin", "TrainConfig.grup_size = 3"])
    err = capsys.readouterr().err
    assert "Did you mean 'group_size'?" in err and "Traceback" not in err


def test_missing_gin_file(capsys, tmp_path):
    rc, err = train(capsys, str(tmp_path / "nope.gin"))
    assert rc == 2 and "nope.gin' not found" in err


def test_unparsable_binding_names_it(capsys):
    rc, err = train(capsys, MIXGRPO, "TrainConfig.num_steps =")
    assert rc == 2 and "cannot parse a --gin binding, line 1" in err and "Class.parameter = value" in err


def test_unclosed_bracket_names_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'methods/mixgrpo.gin'\nTrainConfig.group_size = (\n")
    rc, err = train(capsys, str(bad))
    assert rc == 2 and f"cannot parse {bad}" in err and "bracket or quote is not closed" in err


@pytest.mark.parametrize("binding, expected", [
    ("TrainConfig.group_size = 1", "a group needs at least 2 samples"),
    ("ProgressiveWindow.window_size = 30", "window_size=30 exceeds num_steps=8"),
    ("ProgressiveWindow.stride = -1", "stride must be an integer >= 0, got -1"),
    ("MixGRPO.clip_range = 0.0", "clip_range must be > 0, got 0.0"),
    ("post/DPMSolverPP.ordr = 1", "Valid parameters of DPMSolverPP: order. Did you mean 'order'?"),
    ("TrainConfig.compression = 0.0", "must be in (0, 1]"),
    ("TrainConfig.num_minibatches = 4", "num_minibatches=4 must divide the 6 samples"),
    ("TrainConfig.prompt_set = 'file'", "prompt_set 'file' (FilePrompts) needs train_path"),
])
def test_incompatible_settings_stop_before_the_model_loads(capsys, tmp_path, binding, expected):
    rc, err = train(capsys, MIXGRPO, *TOY, "TrainConfig.backbone = 'flux'", NO_MODEL, binding,
                    output=tmp_path / "run")
    assert rc == 2 and expected in err
    assert not (tmp_path / "run").exists()  # nothing written either


def test_model_directory_missing_or_partial(capsys, tmp_path):
    rc, err = train(capsys, MIXGRPO, *TOY, "TrainConfig.backbone = 'flux'", NO_MODEL, output=tmp_path / "run")
    assert rc == 2 and "'/nonexistent/flux' does not exist" in err and "never downloads" in err
    (tmp_path / "model" / "tokenizer").mkdir(parents=True)
    rc, err = train(capsys, MIXGRPO, *TOY, "TrainConfig.backbone = 'flux'",
                    f"FluxBackbone.path = '{tmp_path / 'model'}'", output=tmp_path / "run")
    assert rc == 2 and "has no transformer/ folder" in err


def test_empty_prompt_file(capsys, tmp_path):
    (tmp_path / "train.txt").write_text("\n\n")
    rc, err = train(capsys, MIXGRPO, *TOY, "TrainConfig.prompt_set = 'file'",
                    f"FilePrompts.train_path = '{tmp_path / 'train.txt'}'", output=tmp_path / "run")
    assert rc == 2 and "train.txt" in err and "need prompts" in err


@pytest.mark.parametrize("empty", ["train", "eval"])
def test_an_empty_prompt_file_names_its_own_binding(capsys, tmp_path, empty):
    """The empty file's binding and path, the split it leaves empty, and a fix for that split (an
    empty train file is not fixed by an eval file, which is already bound)."""
    files = {split: tmp_path / f"{split}.txt" for split in ("train", "eval")}
    for split, path in files.items():
        path.write_text("\n\n" if split == empty else "a red circle\ntwo blue squares\n")
    rc, err = train(capsys, MIXGRPO, *TOY, "TrainConfig.prompt_set = 'file'",
                    f"FilePrompts.train_path = '{files['train']}'", f"FilePrompts.eval_path = '{files['eval']}'",
                    output=tmp_path / "run")
    other = "eval" if empty == "train" else "train"
    assert rc == 2
    assert f"FilePrompts.{empty}_path = '{files[empty]}'" in err and f"the {empty} split is empty" in err
    assert f"FilePrompts.{other}_path" not in err and str(files[other]) not in err
    assert ("train=0, eval=2" if empty == "train" else "train=2, eval=0") in err


def test_a_train_file_too_short_to_hold_out_prompts_suggests_an_eval_file(capsys, tmp_path):
    (tmp_path / "train.txt").write_text("a red circle\n")
    rc, err = train(capsys, MIXGRPO, *TOY, "TrainConfig.prompt_set = 'file'",
                    f"FilePrompts.train_path = '{tmp_path / 'train.txt'}'", output=tmp_path / "run")
    assert rc == 2 and f"FilePrompts.train_path = '{tmp_path / 'train.txt'}' holds 1 prompt(s)" in err
    assert "train=1, eval=0" in err and "bind FilePrompts.eval_path" in err


@pytest.mark.parametrize("binding, named", [
    ("TrainConfig.learning_rate = -1e-3", "TrainConfig.learning_rate = -0.001: the learning rate must be > 0"),
    ("TrainConfig.learning_rate = 0", "TrainConfig.learning_rate = 0: the learning rate must be > 0"),
    ("TrainConfig.weight_decay = -0.1", "TrainConfig.weight_decay = -0.1: AdamW's weight decay must be >= 0"),
    ("TrainConfig.max_grad_norm = 0.0", "TrainConfig.max_grad_norm = 0.0: gradients are clipped"),
    ("TrainConfig.adam_betas = (0.9, 1.0)", "TrainConfig.adam_betas = (0.9, 1.0): AdamW takes two betas"),
    ("TrainConfig.adam_betas = (-0.1, 0.999)", "TrainConfig.adam_betas = (-0.1, 0.999)"),
    ("TrainConfig.ema_decay = 1.0", "TrainConfig.ema_decay = 1.0: the moving average's decay must be in [0, 1)"),
    ("TrainConfig.eval_every = -1", "TrainConfig.eval_every = -1: iterations between held-out evaluations"),
    ("TrainConfig.sample_every = -5", "TrainConfig.sample_every = -5: iterations between sample grids"),
    ("TrainConfig.checkpoint_every = -1", "TrainConfig.checkpoint_every = -1: iterations between checkpoints"),
    ("TrainConfig.eval_prompts = 0", "TrainConfig.eval_prompts = 0: the number of held-out prompts"),
    ("TrainConfig.eval_seeds = 0", "TrainConfig.eval_seeds = 0: the number of sampling seeds"),
    ("TrainConfig.sample_prompts = 0", "TrainConfig.sample_prompts = 0: the number of prompts per sample grid"),
])
def test_optimizer_and_bookkeeping_numbers_are_refused_naming_the_binding(capsys, tmp_path, binding, named):
    out = tmp_path / "run"
    rc = main(["train", str(ROOT / "experiments" / "runs" / "toy_smoke.gin"), "--output", str(out), "--gin", binding])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert named in err
    field = binding.split("=")[0].strip()
    assert f'--gin "{field} = ' in err  # the fix, as a line to type
    assert not out.exists()  # refused before the run directory is made, before any model loads


@pytest.mark.parametrize("binding", ["TrainConfig.ema_decay = None", "TrainConfig.ema_decay = 0.0",
                                     "TrainConfig.weight_decay = 0.0", "TrainConfig.eval_every = 0",
                                     "TrainConfig.adam_betas = (0.0, 0.0)", "TrainConfig.max_grad_norm = 1e9"])
def test_the_edges_of_the_optimizer_ranges_are_accepted(binding):
    from mixgrpo.core.config import load_config

    load_config(ROOT / "experiments" / "runs" / "toy_smoke.gin", [binding])


def test_a_gin_file_anywhere_includes_the_shipped_presets(capsys, tmp_path):
    mine = tmp_path / "elsewhere" / "my_experiment.gin"
    mine.parent.mkdir()
    mine.write_text("include 'methods/mixgrpo.gin'\ninclude 'backbones/toy.gin'\n"
                    + "\n".join(TOY) + "\nTrainConfig.progress = False\n")
    assert main(["train", str(mine), "--output", str(tmp_path / "run")]) == 0
    assert "run directory" in capsys.readouterr().out


def test_a_model_of_the_wrong_family_is_named(capsys, tmp_path):
    from mixgrpo.plugins.backbones.tiny import build_tiny_sd3

    sd3 = build_tiny_sd3(tmp_path / "sd3")
    rc, err = train(capsys, MIXGRPO, *TOY, "TrainConfig.backbone = 'flux'", f"FluxBackbone.path = '{sd3}'",
                    output=tmp_path / "run")
    assert rc == 2 and "holds a SD3Transformer2DModel, but the 'flux' backbone loads a FluxTransformer2DModel" in err
    assert "use TrainConfig.backbone = 'sd3'" in err
    (sd3 / "transformer" / "config.json").unlink()  # a partial snapshot
    rc, err = train(capsys, MIXGRPO, *TOY, "TrainConfig.backbone = 'sd3'", f"SD3Backbone.path = '{sd3}'",
                    output=tmp_path / "run")
    assert rc == 2 and "has no config.json: an incomplete diffusers snapshot" in err


FLOWGRPO = str(ROOT / "experiments" / "methods" / "flowgrpo.gin")


@pytest.mark.parametrize("config, bindings, where", [
    # FlowGRPO samples every step with the SDE, the last one (into σ = 0) included
    (FLOWGRPO, (), "TrainConfig.schedule = 'all' makes step 7, the last of 8, an SDE step at iteration 1"),
    # MixGRPO's window (3 of 8 steps, moving every 25 iterations) reaches the last step at iteration 126
    (MIXGRPO, ("TrainConfig.iterations = 200",),
     "TrainConfig.schedule = 'progressive' makes step 7, the last of 8, an SDE step at iteration 126"),
], ids=["flowgrpo-all", "mixgrpo-progressive"])
def test_cps_with_a_schedule_that_samples_the_last_step_stops_before_the_model_loads(
        capsys, tmp_path, config, bindings, where):
    rc, err = train(capsys, config, *TOY, "TrainConfig.backbone = 'flux'", NO_MODEL,
                    "TrainConfig.sde_sampler = 'sde.cps'", *bindings, output=tmp_path / "run")
    assert rc == 2
    assert err.startswith("mixgrpo train: error: TrainConfig.sde_sampler = 'sde.cps' (CPSSDE) cannot take the "
                          "grid's last step, into σ = 0, as an SDE step (its std is 0 there")
    assert where in err
    assert "Use an SDE sampler that takes the last step (sde.dance, sde.flow)" in err
    assert "whose window ends before step 7 at every iteration" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_cps_with_a_window_that_stops_before_the_last_step_is_accepted(toy_config):
    from mixgrpo.core.trainer import Trainer

    # 100 iterations, a move every 40: the window starts at 0, 1, 2 and never reaches step 7
    cfg, pm = toy_config("mixgrpo", "TrainConfig.sde_sampler = 'sde.cps'", "TrainConfig.iterations = 100",
                         "ProgressiveWindow.shift_interval = 40")
    trainer = Trainer(cfg, pm)
    assert type(trainer.sde_sampler).__name__ == "CPSSDE" and not trainer.sde_sampler.supports_final_step
    trainer.close()


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path):
    """The two ways of reusing a run directory exclude each other: argparse says so, exit 2."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", MIXGRPO, "--resume", "--overwrite", "--output", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "--overwrite: not allowed with argument --resume" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_names_the_start_modes(toy_config, tmp_path):
    from mixgrpo.core.trainer import Trainer

    cfg, pm = toy_config("mixgrpo", f"TrainConfig.output_dir = '{tmp_path / 'run'}'")
    with pytest.raises(ValueError, match="start must be one of new, resume, overwrite, got 'continue'"):
        Trainer(cfg, pm).train("continue")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("bindings, expected", [
    (["TrainConfig.grid = 'dynamic'"], "TrainConfig.grid = 'dynamic' needs TrainConfig.mu"),
    (["TrainConfig.grid = 'dynamc'"], "TrainConfig.grid = 'dynamc': one of static, dynamic, diffusers"),
])
def test_a_grid_that_cannot_be_built_is_refused_before_the_model_loads(capsys, tmp_path, bindings, expected):
    rc, err = train(capsys, MIXGRPO, *TOY, "TrainConfig.backbone = 'flux'", NO_MODEL, *bindings,
                    output=tmp_path / "run")
    assert rc == 2 and expected in err
    assert not (tmp_path / "run").exists()
