"""BranchGRPO: the branching schedule, the depth-wise advantages and the presets.

The reference numbers (tests/plugins/data/branchgrpo_reference.json) come from the reference's own
functions (Fredreic1849/BranchGRPO, fastvideo/train_branchgrpo_flux.py: ``parse_split_points``,
``run_tree_sample_step`` with a stand-in transformer that counts its rows,
``compute_node_rewards_from_leaves`` and ``compute_hierarchical_advantages_by_depth`` on fixed leaf
rewards), run once outside this repository; the JSON names the commit.
"""

import json
from pathlib import Path

import gin
import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.rollout import SamplingSetup, rollout
from mixgrpo.core.trainer import Trainer
from mixgrpo.core.tree import level_ids
from mixgrpo.core.types import first_of_each
from mixgrpo.plugins.objectives import branchgrpo
from mixgrpo.plugins.objectives.branchgrpo import BranchGRPO
from mixgrpo.plugins.schedules import branching
from mixgrpo.plugins.schedules.branching import Branching
from mixgrpo.testing.objectives import ObjectiveContract

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((Path(__file__).parent / "data" / "branchgrpo_reference.json").read_text())
CASES = REFERENCE["cases"]


def plugin_manager():
    """The built-ins plus the tree's schedule and objective (once pyproject registers them, as they are)."""
    pm = PluginManager()
    missing = [m for m, kind, name in ((branching, "schedule", "branching"), (branchgrpo, "objective", "branchgrpo"))
               if name not in pm.names(kind)]
    return PluginManager(plugins=missing) if missing else pm


def _schedule(case):
    window = case["mix_sde_window_size"] if case["mix_ode_sde_tree"] else None
    return Branching(branch_steps=tuple(case["split_points"]), mix_window=window)


def test_the_reference_data_names_its_source():
    source = REFERENCE["source"]
    assert source["repo"] == "Fredreic1849/BranchGRPO" and len(source["commit"]) == 40
    assert source["path"] == "fastvideo/train_branchgrpo_flux.py"


# -- the schedule, against the reference ----------------------------------------------------------
def test_the_default_schedule_is_the_reference_script():
    case = CASES["script_full"]
    schedule = Branching()
    assert schedule.branch_steps == tuple(case["split_points"]) == (0, 3, 6, 9)
    assert schedule.leaves() == case["leaves"] == 16


@pytest.mark.parametrize("name", sorted(CASES))
def test_sde_and_branch_steps_are_the_references(name):
    case = CASES[name]
    plan = _schedule(case).plan(0, case["num_steps"])
    assert list(plan.sde_steps) == case["sde_steps"]
    assert list(plan.train_steps) == case["sde_steps"]  # every SDE edge trains (no pruning)
    assert list(plan.branch_steps) == case["split_points"] and plan.branch_factor == 2


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_tree_shares_what_the_references_tree_shares(name):
    """Per leaf and step: the node of the input and of the transition, named by their first leaf."""
    case = CASES[name]
    plan = _schedule(case).plan(0, case["num_steps"])
    n = case["leaves"]
    groups, samples = torch.zeros(n, dtype=torch.long), torch.arange(n)
    for i in range(case["num_steps"]):
        before = sum(s < i for s in plan.branch_steps)
        after = sum(s <= i for s in plan.branch_steps)
        assert level_ids(plan, groups, samples, before).tolist() == [row[i] for row in case["inputs"]]
        assert level_ids(plan, groups, samples, after).tolist() == [row[i] for row in case["edges"]]


@pytest.mark.parametrize("name", ["script_full", "script_mix", "toy_mix"])
def test_model_calls_per_step_are_the_references(name):
    case = CASES[name]
    config, pm = load_config(ROOT / "experiments" / "methods" / "branchgrpo.gin", [
        "TrainConfig.backbone = 'toy'", f"TrainConfig.num_steps = {case['num_steps']}",
        f"TrainConfig.group_size = {case['leaves']}", "TrainConfig.rewards = {'shapes.preference': 1.0}",
        f"Branching.branch_steps = {tuple(case['split_points'])}", "TrainConfig.output_dir = '/nonexistent'"],
        pm=plugin_manager())
    backbone = pm.create("backbone", "toy")
    rows = []
    inner = backbone.velocity
    backbone.velocity = lambda x, sigma, cond: rows.append(x.shape[0]) or inner(x, sigma, cond)
    plan = _schedule(case).plan(0, case["num_steps"])
    n = case["leaves"]
    traj = rollout(backbone, ["a red circle"] * n, torch.zeros(n, dtype=torch.long), torch.arange(n), plan,
                   setup=SamplingSetup(num_steps=case["num_steps"]), sde_sampler=pm.create("sampler", "sde.dance"),
                   pre_solver=pm.create("sampler", "euler"), post_solver=pm.create("sampler", "euler"), seed=0,
                   iteration=0, batch_size=n)
    gin.clear_config()
    assert rows == case["model_rows_per_step"]
    assert traj.nfe == pytest.approx(sum(case["model_rows_per_step"]) / n)


# -- the advantages, against the reference --------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_depth_wise_advantages_are_the_references(name):
    case = CASES[name]
    steps = case["sde_steps"]
    edges = torch.tensor([[row[i] for i in steps] for row in case["edges"]])
    rewards = torch.tensor(case["leaf_rewards"])
    got = BranchGRPO().step_advantages({"reward": rewards}, torch.zeros(len(rewards), dtype=torch.long), edges)
    want = torch.tensor([[row[i] for i in steps] for row in case["advantages"]])
    assert got.shape == want.shape and want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_node_rewards_are_the_mean_of_their_leaves_and_trees_are_normalized_apart():
    case = CASES["toy_full"]
    rewards = torch.tensor(case["leaf_rewards"] * 2)
    rewards[4:] = rewards[4:] * 10 + 3  # a second tree on another scale: normalized among its own nodes
    groups = torch.tensor([0] * 4 + [1] * 4)
    edges = torch.tensor([[0, 0, 2, 2, 4, 4, 6, 6], [0, 1, 2, 3, 4, 5, 6, 7]]).T
    got = BranchGRPO().step_advantages({"reward": rewards}, groups, edges)
    torch.testing.assert_close(got[:4], got[4:], rtol=1e-5, atol=1e-5)
    # depth with two nodes: means 0.29 and 0.32 -> z-scores of two values, -1/sqrt(2) and +1/sqrt(2)
    torch.testing.assert_close(got[:4, 0], torch.tensor([-1, -1, 1, 1]) / 2 ** 0.5, rtol=1e-5, atol=1e-5)
    # leaves: the plain group advantages of every GRPO objective
    torch.testing.assert_close(got[:, 1], BranchGRPO().advantages({"reward": rewards}, groups))
    # a failed leaf (NaN) is left out of its node's mean; a node with none gets 0
    rewards[0] = float("nan")
    got = BranchGRPO().step_advantages({"reward": rewards}, groups, edges)
    assert torch.isfinite(got).all() and got[0, 1] == 0


# -- pruning ----------------------------------------------------------------------------------------
def test_depth_pruning_leaves_edges_into_those_depths_untrained_and_slides_up():
    schedule = Branching(prune_depths=(15, 16, 17, 18), prune_slide_every=30, prune_stop_depth=9)
    trained = set(range(20))
    assert set(schedule.plan(0, 20).train_steps) == trained - {14, 15, 16, 17}  # depth d: the edge of step d-1
    assert schedule.pruned_depths(28) == (15, 16, 17, 18) and schedule.pruned_depths(29) == (14, 15, 16, 17)
    assert schedule.pruned_depths(10_000) == (9, 10, 11, 12)  # the shallowest stops at depth 9
    assert set(schedule.plan(0, 20).sde_steps) == trained


def _reference_width_pruning(adv, after, mode, ratio):
    """The reference's width-pruning lines re-derived with Python lists (train_branchgrpo_flux.py @ 19fbb9f,
    after depth pruning): the transitions after the last split, in its depth-first order (leaf by leaf,
    steps ascending), sorted by advantage with Python's stable sort; returns the kept (row, column)s."""
    last = [{"row": n, "col": k, "advantage": float(adv[n, k])} for n in range(adv.shape[0])
            for k in range(after, adv.shape[1])]
    if mode == "per_branch":  # mode 1: per branch of the last split (here: per leaf)
        kept = []
        for n in range(adv.shape[0]):
            group = [s for s in last if s["row"] == n]
            kept += sorted(group, key=lambda s: s["advantage"], reverse=True)[:max(1, int(len(group) * ratio))]
    else:  # mode 2: the best and the worst over all of them
        ordered = sorted(last, key=lambda s: s["advantage"], reverse=True)
        keep = max(2, int(len(ordered) * ratio))
        best = keep // 2
        kept = ordered[:best] + (ordered[-(keep - best):] if keep - best > 0 else [])
    return {(s["row"], s["col"]) for s in kept}


@pytest.mark.parametrize("mode", ["per_branch", "best_worst"])
@pytest.mark.parametrize("ratio", [0.5, 0.3, 1.0])
def test_width_pruning_keeps_what_the_references_lines_keep(mode, ratio):
    # two trees of 4 leaves, split at stored steps 0 and 1 of 5: the last layer is steps 2-4
    edges = torch.tensor([[0, 0, 2, 2, 4, 4, 6, 6], [0, 1, 2, 3, 4, 5, 6, 7]] + [list(range(8))] * 3).T
    groups = torch.tensor([0] * 4 + [1] * 4)
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.3, 0.8, 0.2, 0.7], dtype=torch.float64)
    assert branchgrpo.last_layer(groups, edges) == 2
    full = BranchGRPO().step_advantages({"reward": rewards}, groups, edges)
    pruned = BranchGRPO(width_pruning=mode, width_ratio=ratio).step_advantages({"reward": rewards}, groups, edges)
    torch.testing.assert_close(pruned[:, :2], full[:, :2])  # before the last layer nothing is pruned
    kept = {(n, k) for n in range(8) for k in range(2, 5) if not torch.isnan(pruned[n, k])}
    assert kept == _reference_width_pruning(full, 2, mode, ratio)
    assert all(pruned[n, k] == full[n, k] for n, k in kept)
    assert len(kept) < 24 or ratio == 1.0


def test_width_pruning_trains_only_the_kept_transitions(tmp_path):
    config, pm = load_config(ROOT / "experiments" / "methods" / "branchgrpo.gin",
                             [*TOY, f"TrainConfig.output_dir = '{tmp_path}'", "TrainConfig.iterations = 1",
                              "BranchGRPO.width_pruning = 'per_branch'"], pm=plugin_manager())
    trainer = Trainer(config, pm)
    assert trainer.objective.width_pruning == "per_branch" and trainer.objective.width_ratio == 0.5
    (row,) = trainer.train()
    gin.clear_config()
    # splits at 1 and 3 of 8: rows 1 + 1 + 2 + 2 up to the last split, then each leaf trains 2 of its
    # 4 later transitions (instead of 4): (6 + 4 * 2) / 4 model calls per sample
    assert row["perf/nfe_train"] == pytest.approx((6 + 4 * 2) / 4)
    assert row["policy/onpolicy_ratio_dev"] < 1e-5 and row["policy/skipped_steps"] == 0.0
    with pytest.raises(ValueError, match="width_ratio must be in"):
        BranchGRPO(width_ratio=0.0)
    with pytest.raises(ValueError, match="width_pruning"):
        BranchGRPO(width_pruning="best")


def test_bad_schedule_arguments_are_refused():
    with pytest.raises(ValueError, match=r"branch_steps must be non-empty, increasing integers >= 0, got \(3, 1\)"):
        Branching(branch_steps=(3, 1))
    with pytest.raises(ValueError, match="branch_factor must be an integer >= 2"):
        Branching(branch_factor=1)
    with pytest.raises(ValueError, match=r"Branching.mix_window = 30 exceeds TrainConfig.num_steps = 20"):
        Branching(mix_window=30).plan(0, 20)


# -- the objective's contract -----------------------------------------------------------------------
class TestBranchGRPOContract(ObjectiveContract):
    def make_objective(self):
        return BranchGRPO()


class TestProbWeightedBranchGRPOContract(ObjectiveContract):
    def make_objective(self):
        return BranchGRPO(prob_weighted=True)


# -- the presets train ----------------------------------------------------------------------------
TOY = ["include 'backbones/toy.gin'", "TrainConfig.num_steps = 8", "TrainConfig.group_size = 4",
       "Branching.branch_steps = (1, 3)", "TrainConfig.prompts_per_iteration = 2",
       "TrainConfig.rollout_batch_size = 8", "TrainConfig.micro_batch_size = 3", "TrainConfig.num_minibatches = 1",
       "TrainConfig.iterations = 2", "TrainConfig.learning_rate = 1e-3",
       "TrainConfig.rewards = {'shapes.preference': 1.0}", "TrainConfig.progress = False",
       "TrainConfig.tensorboard = False"]


@pytest.mark.parametrize(("preset", "method", "nfe_train"), [
    # a tree split at steps 1 and 3 of 8: model rows per step 1, 1, 2, 2, 4, 4, 4, 4 = 22 for 4 leaves
    ("branchgrpo", "BranchGRPO", 22 / 4),
    # Mix: SDE (trained) steps 0..3 of the window of 4 (and the splits 1, 3): rows 1 + 1 + 2 + 2 = 6
    ("branchgrpo_mix", "BranchGRPO-Mix", 6 / 4),
])
def test_presets_train_two_iterations_on_policy_with_hand_counted_nfe(tmp_path, preset, method, nfe_train):
    config, pm = load_config(ROOT / "experiments" / "methods" / f"{preset}.gin",
                             [*TOY, f"TrainConfig.output_dir = '{tmp_path}'"], pm=plugin_manager())
    assert config.method == method
    trainer = Trainer(config, pm)
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters()]
    rows = trainer.train()
    gin.clear_config()
    assert len(rows) == 2
    for row in rows:
        assert row["policy/onpolicy_ratio_dev"] < 1e-5
        assert row["perf/nfe_rollout"] == pytest.approx(22 / 4)
        assert row["perf/nfe_train"] == pytest.approx(nfe_train)
        assert row["policy/skipped_steps"] == 0.0
    after = trainer.backbone.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


# -- probability-weighted fusion (--tree_prob_weighted), against the reference ------------------
# Written by make_branchgrpo_fusion_reference.py: the reference's own TreeNode,
# compute_node_rewards_from_leaves(use_prob_weighted=True) and compute_hierarchical_advantages_by_depth.
FUSION = json.loads((Path(__file__).parent / "data" / "branchgrpo_fusion_reference.json").read_text())


@pytest.mark.parametrize("name", sorted(FUSION["cases"]))
def test_probability_weighted_fusion_is_the_references(name):
    from mixgrpo.plugins.objectives.branchgrpo import fused_node_rewards

    assert FUSION["source"]["commit"] == REFERENCE["source"]["commit"]
    case = FUSION["cases"][name]
    edges, log_prob = torch.tensor(case["edges"]), torch.tensor(case["log_prob"])
    rewards = torch.tensor(case["leaf_rewards"])
    nodes = fused_node_rewards(rewards, edges, log_prob)
    torch.testing.assert_close(nodes, torch.tensor(case["node_rewards"], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    objective = BranchGRPO(prob_weighted=True)
    assert objective.advantages_use_log_probs and not BranchGRPO().advantages_use_log_probs
    got = objective.step_advantages({"reward": rewards}, torch.zeros(len(rewards), dtype=torch.long), edges,
                                    log_prob=log_prob)
    want = torch.tensor(case["advantages"])
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the weighting is not the mean: above the last split a node's reward differs from its leaves' mean
    from mixgrpo.plugins.objectives.branchgrpo import node_rewards

    ids, first, which = first_of_each(edges[:, 0])
    mean = node_rewards(rewards, which, len(ids))[which]
    assert (nodes[:, 0] - mean).abs().max() > 1e-3


def test_fusion_leaves_failed_children_out_and_needs_the_log_probs():
    from mixgrpo.plugins.objectives.branchgrpo import fused_node_rewards

    edges = torch.tensor([[0, 0], [0, 1], [2, 2], [2, 3]])  # two splits: (0 | 2) at step 0, then each in two
    log_prob = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 2.0], [1.0, 0.0]])
    nodes = fused_node_rewards(torch.tensor([1.0, float("nan"), 0.0, 1.0]), edges, log_prob)
    e = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0)
    assert float(nodes[0, 0]) == 1.0  # its one scored child
    assert float(nodes[2, 0]) == pytest.approx(float(e[1]))  # softmax(2, 0) · (0, 1)
    assert torch.isnan(nodes[1, 1]) and float(nodes[3, 1]) == 1.0
    with pytest.raises(ValueError, match="pass log_prob"):
        BranchGRPO(prob_weighted=True).step_advantages({"r": torch.ones(4)}, torch.zeros(4, dtype=torch.long), edges)


def test_the_trainer_gives_the_fusion_the_rollouts_log_probs(tmp_path):
    config, pm = load_config(ROOT / "experiments" / "methods" / "branchgrpo.gin",
                             [*TOY, f"TrainConfig.output_dir = '{tmp_path}'", "TrainConfig.iterations = 1",
                              "BranchGRPO.prob_weighted = True"], pm=plugin_manager())
    trainer = Trainer(config, pm)
    prompts, group_ids, sample_ids = trainer.local_batch(0)
    traj = trainer.rollout_rows(prompts, group_ids, sample_ids, trainer.plan(0, sample_ids), 0)
    scores = {"shapes.preference": torch.linspace(0.1, 0.9, len(traj))}
    got = trainer.advantages(scores, traj)
    want = trainer.objective.step_advantages(scores, traj.group_ids, traj.edge_ids, log_prob=traj.log_prob)
    torch.testing.assert_close(got, want)
    (row,) = trainer.train()
    gin.clear_config()
    assert row["policy/onpolicy_ratio_dev"] < 1e-5 and row["policy/skipped_steps"] == 0.0


def test_pruning_stops_after_prune_until_as_the_references_pruning_step_ratio(tmp_path):
    # the reference prunes while its training step k + 1 <= int(n · --pruning_step_ratio): here 1 of 2
    objective = BranchGRPO(width_pruning="per_branch", prune_until=1)
    assert objective.at_iteration(0) is objective
    assert objective.at_iteration(1) == BranchGRPO(width_pruning="none")
    assert BranchGRPO().at_iteration(5) == BranchGRPO()
    schedule = Branching(branch_steps=(1, 3), prune_depths=(5,), prune_until=1)
    assert 4 not in schedule.plan(0, 8).train_steps and schedule.plan(1, 8).train_steps == tuple(range(8))
    config, pm = load_config(ROOT / "experiments" / "methods" / "branchgrpo.gin",
                             [*TOY, f"TrainConfig.output_dir = '{tmp_path}'", "TrainConfig.iterations = 2",
                              "BranchGRPO.width_pruning = 'per_branch'", "BranchGRPO.prune_until = 1"],
                             pm=plugin_manager())
    rows = Trainer(config, pm).train()
    gin.clear_config()
    # iteration 1 prunes (2 of each leaf's 4 transitions after the last split), iteration 2 trains them all
    assert [r["perf/nfe_train"] for r in rows] == [pytest.approx((6 + 4 * 2) / 4), pytest.approx(22 / 4)]
    with pytest.raises(ValueError, match="BranchGRPO.prune_until must be an iteration >= 0"):
        BranchGRPO(prune_until=-1)
