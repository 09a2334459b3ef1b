"""The plugin manager: entry-point loading, registries, failures, clear errors, documented hooks."""

import inspect
import re
from pathlib import Path

import pytest

from mixgrpo import hookimpl
from mixgrpo.core import hookspecs
from mixgrpo.core.plugins import KINDS, PluginManager, UnknownComponentError

ROOT = Path(__file__).resolve().parents[2]

BUILTIN = {
    "backbone": {"toy", "flux", "sd3", "qwenimage", "flux2", "zimage", "flux_kontext"},
    "sampler": {"euler", "dpmsolver++", "sde.flow", "sde.dance", "sde.cps"},
    "schedule": {"all", "random_subset", "fixed", "progressive", "random", "decay", "ode", "fast", "branching"},
    "reward": {"shapes.composition", "shapes.preference", "clip_score", "pickscore", "hpsv2", "imagereward",
               "aesthetic", "jpeg_compressibility", "jpeg_incompressibility", "vlm_judge", "ocr", "geneval",
               "edit_clip", "shapes.brightness"},
    "objective": {"flowgrpo", "dancegrpo", "mixgrpo", "diffusionnft", "awm", "branchgrpo"},
    "prompt_set": {"shapes", "file", "edit"},
}


@pytest.fixture(scope="module")
def pm():
    return PluginManager()


def test_builtins_load_through_the_entry_point_group(pm):
    assert pm.failures == []
    for kind, names in BUILTIN.items():
        assert names <= set(pm.names(kind)), kind
    entry = pm.get("sampler", "euler")
    assert entry.origin.startswith("mixgrpo ")  # found through the distribution's entry points
    assert entry.plugin == "euler"


def test_unknown_name_lists_the_known_ones(pm):
    with pytest.raises(UnknownComponentError) as err:
        pm.get("sampler", "sde.flw")
    msg = str(err.value)
    assert "unknown sampler 'sde.flw'" in msg
    for name in BUILTIN["sampler"]:
        assert name in msg
    assert "Did you mean 'sde.flow'?" in msg


def test_unknown_kind_is_an_error(pm):
    with pytest.raises(ValueError, match="unknown component kind 'samplr'"):
        pm.names("samplr")


class _Good:
    class Thing:
        def __init__(self, size=3):
            self.size = size

    @hookimpl
    def register_samplers(self, register):
        register("test.good", self.Thing)


class _Broken:
    @hookimpl
    def register_samplers(self, register):
        raise RuntimeError("boom in register")


def test_a_plugin_that_raises_is_reported_and_the_others_still_load():
    pm = PluginManager(load_entry_points=False, plugins=[_Broken(), _Good()])
    assert pm.create("sampler", "test.good", size=5).size == 5
    assert len(pm.failures) == 1
    assert "RuntimeError: boom in register" in pm.failures[0].error
    with pytest.raises(UnknownComponentError, match="plugins that failed to load: _Broken"):
        pm.get("sampler", "nope")


def test_the_same_name_from_two_plugins_is_refused():
    class Other:
        class Thing:
            pass

        @hookimpl
        def register_samplers(self, register):
            register("test.good", self.Thing)

    pm = PluginManager(load_entry_points=False, plugins=[_Good(), Other()])
    assert len(pm.failures) == 1
    assert "registered twice" in pm.failures[0].error


def test_every_hook_is_documented_with_its_exact_signature():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [name for name, fn in vars(hookspecs).items()
             if inspect.isfunction(fn) and hasattr(fn, "mixgrpo_spec")]
    assert set(hooks) >= set(KINDS.values()) | {"on_iteration_end", "on_checkpoint"}
    for name in hooks:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert re.search(rf"{name}\({re.escape(params)}\)", docs), f"{name}({params}) missing from docs/plugins.md"


def test_a_plugin_manager_built_after_a_parse_still_registers():
    import gin

    from mixgrpo.core.config import parse_gin

    parse_gin([], ["TrainConfig.iterations = 1"])  # finalizes, which locks gin's config

    class Late:
        class LateThing:
            pass

        @hookimpl
        def register_samplers(self, register):
            register("test.late", self.LateThing)

    assert gin.config_is_locked()
    pm = PluginManager(load_entry_points=False, plugins=[Late()])
    assert pm.failures == []
    assert "test.late" in pm.names("sampler")


def test_core_depends_on_no_plugin():
    """Nothing under core/ imports mixgrpo.plugins: the shapes world, the rewards and the backbones
    reach the core only through the plugin hooks (commands included)."""
    import ast
    from pathlib import Path

    core = Path(__file__).resolve().parents[2] / "core"
    offenders = []
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("mixgrpo.plugins")]
    assert not offenders, offenders


def test_plugins_add_commands(capsys):
    from mixgrpo.commands.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["pretrain", "experiments/shapes/pretrain.gin"])
    assert args.func.__module__ == "mixgrpo.plugins.world.commands"
    args = parser.parse_args(["serve-reward", "clip_score", "--port", "9001"])
    assert args.func.__module__ == "mixgrpo.plugins.rewards.remote" and args.port == 9001
