"""benchmarks/offpolicy_ratios.py: the per-step log-ratios between a run's checkpoint and the base
model on transitions the base drew (what OP-GRPO's truncation rests on)."""

import math
from pathlib import Path

import pytest

from mixgrpo.core.config import load_config
from mixgrpo.core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
TOY = ["TrainConfig.backbone = 'toy'", "TrainConfig.num_steps = 6", "TrainConfig.group_size = 2",
       "TrainConfig.prompts_per_iteration = 2", "TrainConfig.iterations = 2", "TrainConfig.learning_rate = 1e-2",
       "TrainConfig.progress = False", "TrainConfig.rewards = {'shapes.preference': 1.0}", "FlowGRPO.kl_beta = 0.0",
       "TrainConfig.eval_every = 0", "TrainConfig.sample_every = 0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flowgrpo")
    cfg, pm = load_config(ROOT / "experiments/methods/flowgrpo.gin", [*TOY, f"TrainConfig.output_dir = '{out}'"])
    Trainer(cfg, pm).train()
    return out


def test_the_table_has_one_row_per_sde_step_and_the_trained_policy_moved(offpolicy, run, capsys):
    result = offpolicy.main([str(run), "--prompts", "3", "--group", "2"])
    assert result["steps"] == list(range(6)) and result["samples"] == 6 and result["checkpoint"] == "iter_000002"
    assert all(s > 0 for s in result["std"]) and result["sigma"][0] > result["sigma"][-1]
    assert all(math.isfinite(v) and v > 0 for v in result["mean_abs_delta"])
    assert all(m >= a for m, a in zip(result["max_abs_delta"], result["mean_abs_delta"], strict=True))
    assert len(result["log_weight_std"]) == 6 and all(math.isfinite(v) for v in result["log_weight_std"])
    assert "std of log w" in capsys.readouterr().out


def test_the_base_weights_reproduce_the_rollouts_log_probs(offpolicy, run, monkeypatch):
    from mixgrpo.core import checkpoint as ckpt

    monkeypatch.setattr(ckpt, "load_module_weights", lambda module, path: "kept the base")
    result = offpolicy.measure(run, prompts=3, group=2)
    assert max(result["max_abs_delta"]) < 1e-4  # the recomputation of a transition is its rollout's


def test_a_missing_checkpoint_is_named(offpolicy, run):
    with pytest.raises(SystemExit, match="no checkpoint 7 under"):
        offpolicy.measure(run, checkpoint="7")
