"""gin configuration: every shipped file parses; unknown names and misspelled bindings say what is valid."""

import subprocess
import sys
from pathlib import Path

import gin
import pytest

from mixgrpo.core.config import ConfigError, TrainConfig, load_config, parse_gin
from mixgrpo.core.plugins import UnknownComponentError

ROOT = Path(__file__).resolve().parents[2]
GIN_FILES = sorted((ROOT / "experiments").rglob("*.gin"))
# Macros that real experiments require (local weight folders); bound to dummies to parse.
DUMMY_MACROS = ["FLUX_PATH = '/nonexistent/flux'", "SD3_PATH = '/nonexistent/sd3'",
                "FLUX2_PATH = '/nonexistent/flux2'", "QWENIMAGE_PATH = '/nonexistent/qwen'",
                "SD35_LARGE_PATH = '/nonexistent/sd35l'", "ZIMAGE_PATH = '/nonexistent/zimage'",
                "PROMPTS_TRAIN = '/nonexistent/train.txt'", "PROMPTS_TEST = '/nonexistent/test.txt'"]


def test_there_are_gin_files_for_every_method():
    names = {p.stem for p in GIN_FILES}
    assert {"flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"} <= names


@pytest.mark.parametrize("path", GIN_FILES, ids=[str(p.relative_to(ROOT / "experiments")) for p in GIN_FILES])
def test_every_shipped_gin_file_parses(path):
    head = path.read_text().lstrip().splitlines()[0]
    assert head.startswith("#"), f"{path.name} must open with a comment on where its numbers come from"
    parse_gin([path], [*DUMMY_MACROS, "PICKSCORE_PATH = '/nonexistent/pickscore'",
                       "KONTEXT_PATH = '/nonexistent/kontext'", "CLIP_PATH = '/nonexistent/clip'",
                       "EDITS_TRAIN = '/nonexistent/train.jsonl'", "EDITS_TEST = '/nonexistent/test.jsonl'"])
    if "TrainConfig" in gin.config_str() or path.parent.name != "methods":
        cfg = TrainConfig()
        assert cfg.num_steps >= 1


TOY_BACKBONE = "TrainConfig.backbone = 'toy'"  # a method preset names no model: the experiment does


@pytest.mark.parametrize("method", ["flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"])
def test_method_presets_select_registered_components(method):
    cfg, pm = load_config(ROOT / "experiments" / "methods" / f"{method}.gin", [TOY_BACKBONE])
    for kind, name in cfg.components():
        assert pm.get(kind, name).name == name


def test_paper_numbers_in_presets():
    cfg, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo_flash_star.gin", [TOY_BACKBONE])
    got = (cfg.num_steps, cfg.shift, cfg.compression, cfg.schedule, cfg.post_solver)
    assert got == (25, 3.0, 0.2, "fixed", "dpmsolver++")
    sched = pm.create("schedule", cfg.schedule)
    assert sched.plan(123, 25).window == (0, 4)
    cfg, pm = load_config(ROOT / "experiments" / "methods" / "flowgrpo.gin", [TOY_BACKBONE])
    obj = pm.create("objective", cfg.objective)
    assert (obj.kl_beta, cfg.num_steps, cfg.shared_noise, cfg.group_size) == (0.04, 10, False, 24)


def test_unknown_sampler_name_lists_the_known_ones(tmp_path):
    f = tmp_path / "bad.gin"
    f.write_text(f"include '{ROOT / 'experiments/runs/toy_smoke.gin'}'\nTrainConfig.sde_sampler = 'sde.flw'\n")
    with pytest.raises(UnknownComponentError) as err:
        load_config(f)
    msg = str(err.value)
    assert "unknown sampler 'sde.flw'" in msg and "sde.dance" in msg and "dpmsolver++" in msg


def test_misspelled_parameter_lists_valid_parameters(tmp_path):
    f = tmp_path / "bad.gin"
    f.write_text("FlowSDE.noise_levl = 0.9\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert "noise_levl" in str(err.value)
    assert "Valid parameters of FlowSDE: noise_level" in str(err.value)
    assert "Did you mean 'noise_level'?" in str(err.value)


def test_unknown_configurable_lists_the_configurables(tmp_path):
    f = tmp_path / "bad.gin"
    f.write_text("FlowSDF.noise_level = 0.9\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert "Configurable classes:" in str(err.value) and "FlowSDE" in str(err.value)
    assert "Did you mean 'FlowSDE'?" in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.gin")


def test_cli_reports_unknown_sampler_and_exits_nonzero(tmp_path):
    f = tmp_path / "bad.gin"
    f.write_text(f"include '{ROOT / 'experiments/runs/toy_smoke.gin'}'\nTrainConfig.sde_sampler = 'sde.flw'\n")
    out = subprocess.run([sys.executable, "-m", "mixgrpo", "train", str(f), "--output", str(tmp_path / "r")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown sampler 'sde.flw'; known samplers:" in out.stderr
    assert not (tmp_path / "r").exists()  # nothing was started


def test_cli_plugins_lists_names_by_kind():
    cmd = [sys.executable, "-m", "mixgrpo", "plugins"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    sections: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        if line and not line.startswith(" "):
            current = sections.setdefault(line.rstrip(":"), [])
        elif line.strip():
            current.append(line.split()[0])
    assert {"flux", "sd3", "toy"} <= set(sections["backbones"])
    assert {"euler", "dpmsolver++", "sde.flow"} <= set(sections["samplers"])
    assert {"progressive", "fixed"} <= set(sections["schedules"])
    assert {"hpsv2", "pickscore", "shapes.composition"} <= set(sections["rewards"])
    assert {"flowgrpo", "dancegrpo", "mixgrpo"} <= set(sections["objectives"])
    assert "flux" not in sections["samplers"]


def test_include_parses_when_cwd_has_a_directory_named_like_the_include(tmp_path, monkeypatch):
    # `runs/` (every run's output) in the working directory imports as a namespace package; gin's
    # package-path reader used to crash on it instead of trying the next search path.
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    parse_gin([ROOT / "experiments" / "flux_mixgrpo.gin"], DUMMY_MACROS)
    assert TrainConfig().num_steps == 25


def test_objectives_sharing_one_init_are_configured_apart():
    # MixGRPO and DanceGRPO inherit ClippedGRPO.__init__; a binding on one must not reach the other
    pm = parse_gin([], ["MixGRPO.clip_range = 0.2", "DanceGRPO.adv_clip = 3.0", "FlowGRPO.kl_beta = 0.5"])
    mix, dance, flow = (pm.create("objective", n) for n in ("mixgrpo", "dancegrpo", "flowgrpo"))
    assert (mix.clip_range, mix.adv_clip) == (0.2, 5.0)
    assert (dance.clip_range, dance.adv_clip) == (1e-4, 3.0)
    assert (flow.kl_beta, flow.clip_range) == (0.5, 1e-4)
    with pytest.raises(ConfigError, match="clip_range"):
        parse_gin([], ["MixGRPO.clip_rnge = 0.2"])


def test_every_unbound_required_macro_is_named_at_once_before_anything_loads():
    from mixgrpo.core.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "experiments" / "flux" / "mixgrpo_multi_reward.gin", ["FLUX_PATH = '/nowhere'"])
    message = str(err.value)
    for name in ("PROMPTS_TRAIN", "PROMPTS_TEST", "HPS_CHECKPOINT", "PICKSCORE_PATH", "IMAGEREWARD_CHECKPOINT"):
        assert name in message
    assert "FLUX_PATH" not in message.split("not bound:")[1].split(".")[0]  # the bound one is not listed


# -- required macros follow the components the config selects --------------------------------------
FLUX_RECIPE = ROOT / "experiments" / "flux_mixgrpo.gin"
REWARD_PATHS = ("HPS_CHECKPOINT", "PICKSCORE_PATH", "IMAGEREWARD_CHECKPOINT", "IMAGEREWARD_MED_CONFIG",
                "BERT_TOKENIZER_PATH")
WEIGHT_FREE = "TrainConfig.rewards = {'shapes.preference': 1.0}"  # a reward that needs no checkpoint


def missing_macros(config_file, bindings) -> list[str]:
    """The macros the one error of ``load_config`` names as not bound."""
    with pytest.raises(ConfigError) as err:
        load_config(config_file, bindings)
    return str(err.value).split("not bound: ")[1].split(". ")[0].split(", ")


def test_the_flux_recipe_with_other_rewards_needs_no_reward_paths_but_still_the_model_path():
    assert missing_macros(FLUX_RECIPE, [WEIGHT_FREE]) == ["FLUX_PATH", "PROMPTS_TEST", "PROMPTS_TRAIN"]
    assert missing_macros(FLUX_RECIPE, []) == sorted(["FLUX_PATH", "PROMPTS_TEST", "PROMPTS_TRAIN", *REWARD_PATHS])
    cfg, _ = load_config(FLUX_RECIPE, [WEIGHT_FREE, *DUMMY_MACROS])  # every reward path left unbound
    assert (cfg.backbone, cfg.rewards) == ("flux", {"shapes.preference": 1.0})


def test_required_macros_follow_each_selected_component():
    # one model reward kept, as trained or held-out reward: only its own paths
    assert missing_macros(FLUX_RECIPE, ["TrainConfig.rewards = {'hpsv2': 1.0}", *DUMMY_MACROS]) == ["HPS_CHECKPOINT"]
    assert missing_macros(FLUX_RECIPE, [WEIGHT_FREE, "TrainConfig.eval_rewards = ('pickscore',)", *DUMMY_MACROS]
                          ) == ["PICKSCORE_PATH"]
    # another backbone and prompt set: FLUX_PATH and the prompt files (%gin.REQUIRED) are not needed
    others = ["TrainConfig.backbone = 'toy'", "TrainConfig.prompt_set = 'shapes'"]
    cfg, _ = load_config(FLUX_RECIPE, [WEIGHT_FREE, *others])
    assert (cfg.backbone, cfg.prompt_set) == ("toy", "shapes")
    # the model path still required once the backbone is selected again, whatever selects it
    assert missing_macros(FLUX_RECIPE, [WEIGHT_FREE, "TrainConfig.prompt_set = 'shapes'"]) == ["FLUX_PATH"]


def test_required_macros_are_followed_through_macros_and_unknown_selections_require_all(tmp_path):
    toy = ROOT / "experiments" / "runs" / "toy_smoke.gin"
    chain = ["ROOT_DIR = 'unset:ROOT_DIR'", "HPS_FILE = %ROOT_DIR", "HPSv2Reward.checkpoint = %HPS_FILE",
             "SD3_DIR = %gin.REQUIRED", "SD3Backbone.path = %SD3_DIR"]
    cfg, _ = load_config(toy, chain)  # neither hpsv2 nor sd3 selected
    assert cfg.backbone == "toy"
    assert missing_macros(toy, [*chain, "TrainConfig.eval_rewards = ('hpsv2',)"]) == ["ROOT_DIR"]
    # a macro on TrainConfig itself, or on a configurable that is not a registered component, stays required
    assert missing_macros(toy, ["OUT = 'unset:OUT'", "TrainConfig.output_dir = %OUT"]) == ["OUT"]
    assert missing_macros(toy, ["CMP = %gin.REQUIRED", "CompareConfig.output_dir = %CMP"]) == ["CMP"]
    # a scoped sampler binding counts only where its role uses that sampler
    scoped = ["ORDER = 'unset:ORDER'", "post/DPMSolverPP.order = %ORDER"]
    load_config(toy, scoped)  # post_solver is euler
    assert missing_macros(toy, [*scoped, "TrainConfig.post_solver = 'dpmsolver++'"]) == ["ORDER"]
    # the selection itself unbound: every component's macros are named, the selection's too
    unknown = ["REWARDS = %gin.REQUIRED", "TrainConfig.rewards = %REWARDS", *chain]
    assert missing_macros(toy, unknown) == ["REWARDS", "ROOT_DIR", "SD3_DIR"]


def test_parse_gin_alone_still_requires_every_required_macro():
    # serve-reward, pretrain and compare parse without a training selection: nothing is dropped
    with pytest.raises(ConfigError, match="not bound: SD3_DIR"):
        parse_gin([ROOT / "experiments" / "runs" / "toy_smoke.gin"],
                  ["SD3_DIR = %gin.REQUIRED", "SD3Backbone.path = %SD3_DIR"])
