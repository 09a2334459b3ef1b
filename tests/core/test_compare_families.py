"""experiments/shapes/compare_families.gin: every variant of the second head-to-head is a complete,
valid run on the shapes world, built exactly as `mixgrpo compare` builds it."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest

from mixgrpo.commands.compare import _compare_config, _resolve, _split_variant, _train_config
from mixgrpo.core.config import parse_gin
from mixgrpo.core.gin_files import _search_paths
from mixgrpo.core.interfaces import MatchingObjective, PolicyObjective
from mixgrpo.core.plugins import get_plugin_manager
from mixgrpo.core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ROOT / "experiments" / "shapes" / "compare_families.gin"


def _variants():
    pm = get_plugin_manager()
    gin.clear_config()
    parse_gin([FAMILIES], [], pm)
    cfg = _compare_config(FAMILIES, False)
    search = _search_paths(FAMILIES)
    base = _resolve(cfg.base, search)
    return pm, cfg, base, {label: _split_variant(label, value, search) for label, value in cfg.variants.items()}


def test_the_families_comparison_holds_every_family_on_one_budget():
    _, cfg, _, plans = _variants()
    assert {"DanceGRPO", "MixGRPO", "MixGRPO-Flash*", "Flow-GRPO-Fast", "GRPO-Guard", "BranchGRPO", "BranchGRPO-Mix",
            "DiffusionNFT", "AWM", "TempFlow-GRPO", "OP-GRPO"} <= set(plans)
    assert cfg.metric == "shapes.composition" and cfg.seeds == (0,) and cfg.workers == 2
    # the dearest runs start first (25 minutes on 2 cores: docs/families.md), each one a variant
    assert cfg.start_first[:2] == ("OP-GRPO", "TempFlow-GRPO") and set(cfg.start_first) <= set(plans)


@pytest.mark.parametrize("label", ["MixGRPO", "Flow-GRPO-Fast", "GRPO-Guard", "BranchGRPO", "BranchGRPO-Mix",
                                   "DiffusionNFT", "AWM", "TempFlow-GRPO", "OP-GRPO"])
def test_each_variant_builds_with_the_shared_budget_and_no_reference_model(tmp_path, label):
    pm, _, base, plans = _variants()
    files, extra = plans[label]
    config = _train_config([*files, base, FAMILIES], extra, 0, tmp_path / "run", pm)
    group = 54 if label == "TempFlow-GRPO" else 8  # 6 samples off the trunk at each of 9 branch steps
    assert (config.num_steps, config.prompts_per_iteration, config.group_size, config.iterations) == (10, 4, group, 40)
    assert config.eval_every == 40 and (config.eval_prompts, config.eval_seeds) == (384, 2)  # base and final
    assert config.learning_rate == 3e-5 and config.method == label
    trainer = Trainer(config, pm)  # every check before any model loads, then the shipped model
    assert not trainer.objective.uses_reference  # the comparison runs no reference model
    kind = MatchingObjective if label in ("DiffusionNFT", "AWM") else PolicyObjective
    assert isinstance(trainer.objective, kind)
    # OP-GRPO draws from a pool of 16 prompts, so that its buffer is used
    assert (trainer.replay is not None) == (label == "OP-GRPO")
    assert trainer.prompt_set.pool == (16 if label == "OP-GRPO" else None)
    gin.clear_config()


def test_the_offpolicy_comparison_pairs_op_grpo_with_flowgrpo_on_one_pool(tmp_path):
    pm = get_plugin_manager()
    gin.clear_config()
    file = ROOT / "experiments" / "shapes" / "compare_offpolicy.gin"
    parse_gin([file], [], pm)
    cfg = _compare_config(file, False)
    search = _search_paths(file)
    base = _resolve(cfg.base, search)
    assert set(cfg.variants) == {"FlowGRPO", "OP-GRPO"} and cfg.seeds == (0, 1, 2)
    for label, value in cfg.variants.items():
        files, extra = _split_variant(label, value, search)
        config = _train_config([*files, base, file], extra, 1, tmp_path / label, pm)
        assert (config.group_size, config.prompts_per_iteration, config.iterations, config.eval_every) == (8, 4, 40, 10)
        trainer = Trainer(config, pm)
        assert trainer.prompt_set.pool == 16 and not trainer.objective.uses_reference
        assert (trainer.replay is not None) == (label == "OP-GRPO")
        gin.clear_config()
