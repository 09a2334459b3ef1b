"""Tree rollouts (BranchGRPO, core/tree.py): each group a tree of samples, every node walked once.

The reference is a per-leaf walk written here: each leaf alone down the whole grid, one model call
per step, replaying at every SDE step the noise of the node it is in after the step (keyed by that
node's first leaf). The tree must give the same values with one model call per node and step, and
training at a node shared by several leaves the same gradient as running the model per leaf.
"""

import attrs
import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, rollout
from mixgrpo.core.trainer import Trainer
from mixgrpo.core.tree import level_ids
from mixgrpo.core.types import SolverHistory, first_of_each
from mixgrpo.plugins.objectives import branchgrpo
from mixgrpo.plugins.schedules import branching
from mixgrpo.plugins.schedules.branching import Branching
from tests.core.conftest import ROOT, TOY, Counting, step_gradients

T, G = 6, 4
PROMPTS = ["a red circle"] * G + ["two blue squares"] * G
GROUPS = torch.tensor([0] * G + [1] * G)
SAMPLES = torch.arange(2 * G)
SEED, ITERATION = 3, 1
#: model rows per step of one tree split in two at steps 1 and 3: 1, 1, 2, 2, 4, 4
ROWS_PER_TREE = [1, 1, 2, 2, 4, 4]


def plugin_manager():
    """The built-ins plus the tree's schedule and objective (once pyproject registers them, as they are)."""
    pm = PluginManager()
    missing = [m for m, kind, name in ((branching, "schedule", "branching"), (branchgrpo, "objective", "branchgrpo"))
               if name not in pm.names(kind)]
    return PluginManager(plugins=missing) if missing else pm


@pytest.fixture
def make_trainer(toy_config):
    def make(*extra):
        bindings = ["TrainConfig.schedule = 'branching'", "TrainConfig.objective = 'branchgrpo'",
                    "TrainConfig.sde_sampler = 'sde.dance'", f"TrainConfig.num_steps = {T}",
                    f"TrainConfig.group_size = {G}", "Branching.branch_steps = (1, 3)", *extra]
        config, pm = toy_config("dancegrpo", *bindings)
        return Trainer(config, pm)

    return make


@pytest.fixture
def toy_config(tmp_path):
    def make(method, *extra):
        bindings = [*TOY, f"TrainConfig.output_dir = '{tmp_path / method}'", *extra]
        return load_config(ROOT / "experiments" / "methods" / f"{method}.gin", bindings, pm=plugin_manager())

    return make


def _tree(trainer, plan, batch_size=16):
    setup = SamplingSetup(num_steps=T, shift=3.0, shared_noise=True)
    return rollout(trainer.backbone, PROMPTS, GROUPS, SAMPLES, plan, setup=setup, sde_sampler=trainer.sde_sampler,
                   pre_solver=trainer.pre_solver, post_solver=trainer.post_solver, seed=SEED, iteration=ITERATION,
                   batch_size=batch_size)


def _per_leaf(trainer, plan):
    """Each leaf walked alone: x_T keyed by its group, the SDE noise of step i keyed by the first leaf of
    the node it is in after step i; ODE steps by the post-window solver (a plan without a window)."""
    backbone, shape = trainer.backbone, trainer.backbone.latent_shape()
    sigmas = SamplingSetup(num_steps=T, shift=3.0).sigmas(plan)
    cond = backbone.encode(PROMPTS)
    out = {"x": [], "x_next": [], "log_prob": [], "latents": []}
    for n in range(len(PROMPTS)):
        x = keyed_normal(shape, SEED, ITERATION, "group", int(GROUPS[n]))[None]
        history, rows = SolverHistory(), {"x": [], "x_next": [], "log_prob": []}
        for i in range(T):
            v = backbone.velocity(x, torch.full((1,), float(sigmas[i])), cond.select([n])).float()
            if i in plan.sde_steps:
                splits = sum(s <= i for s in plan.branch_steps)
                node = int(level_ids(plan, GROUPS, SAMPLES, splits)[n])
                noise = keyed_normal(shape, SEED, ITERATION, "sde", node, i)[None]
                res = trainer.sde_sampler.step(x, v, sigmas, i, history=history, noise=noise)
                rows["x"].append(x[0])
                rows["x_next"].append(res.prev_sample[0])
                rows["log_prob"].append(res.log_prob[0])
            else:
                res = trainer.post_solver.step(x, v, sigmas, i, history=history)
            history.append(float(sigmas[i]), res.x0 if res.x0 is not None else x - float(sigmas[i]) * v)
            x = res.prev_sample
        for key, values in rows.items():
            out[key].append(torch.stack(values))
        out["latents"].append(x[0])
    return {key: torch.stack(values) for key, values in out.items()}


@pytest.mark.parametrize("solver", ["euler", "dpmsolver++"])
@pytest.mark.parametrize("mix_window", [None, 1])
def test_the_tree_walks_every_leaf_as_its_own_walk_with_one_call_per_node(make_trainer, solver, mix_window):
    trainer = make_trainer(f"TrainConfig.post_solver = '{solver}'", f"Branching.mix_window = {mix_window}")
    plan = trainer.schedule.plan(0, T)
    calls = Counting(trainer.backbone)
    got = _tree(trainer, plan, batch_size=3)
    tree_rows, calls.rows = sum(calls.rows), []
    want = _per_leaf(trainer, plan)
    assert sum(calls.rows) == 2 * G * T  # the per-leaf walk: every leaf, every step
    for name in ("x", "x_next", "log_prob", "latents"):
        torch.testing.assert_close(getattr(got, name), want[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(got.images, trainer.backbone.decode(want["latents"]).float(), rtol=1e-5, atol=1e-6)
    # one model row per node and step, by hand: 2 trees x (1 + 1 + 2 + 2 + 4 + 4)
    assert tree_rows == 2 * sum(ROWS_PER_TREE) == 28 and got.nfe == pytest.approx(28 / 8)
    # siblings share their input at a split and part there: the split draws each child's own noise
    at_split = got.slot(1)
    assert torch.equal(got.x[0, at_split], got.x[2, at_split])
    assert not torch.equal(got.x_next[0, at_split], got.x_next[2, at_split])
    assert torch.equal(got.x_next[0, at_split], got.x_next[1, at_split])  # leaves 0, 1: one node until step 3


def test_nodes_and_edges_name_what_the_leaves_share(make_trainer):
    trainer = make_trainer()
    traj = _tree(trainer, trainer.schedule.plan(0, T))
    # step 0: one node per tree; step 1 splits (input: one node, edges: two); step 3 splits again
    assert traj.nodes[:, 0].tolist() == [0] * 4 + [4] * 4
    assert traj.edges[:, 1].tolist() == [0, 0, 2, 2, 4, 4, 6, 6]
    assert traj.nodes[:, 3].tolist() == [0, 0, 2, 2, 4, 4, 6, 6]
    assert traj.edges[:, 3].tolist() == list(range(8)) and traj.edges[:, 5].tolist() == list(range(8))


@pytest.mark.parametrize(("step", "tree_rows"), [(1, [2]), (2, [4]), (3, [4])])
def test_training_runs_the_model_once_per_node_with_the_per_leaf_gradient(make_trainer, step, tree_rows):
    trainer = make_trainer()
    traj = _tree(trainer, trainer.schedule.plan(0, T))
    rows = torch.cat([chunk for s, chunk in traj.micro_batches(SAMPLES, traj.plan.train_mask(8), 8) if s == step])
    calls = Counting(trainer.backbone)
    tree_log_prob, tree_grad = step_gradients(trainer, traj, rows, step)
    assert calls.rows == tree_rows  # nodes at the step's input, both trees
    calls.rows = []
    leaf_log_prob, leaf_grad = step_gradients(trainer, attrs.evolve(traj, nodes=None), rows, step)
    assert calls.rows == [len(rows)]  # the per-leaf reference: one model row per transition
    torch.testing.assert_close(tree_log_prob, leaf_log_prob, rtol=1e-6, atol=1e-5)
    assert tree_grad.abs().max() > 0
    torch.testing.assert_close(tree_grad, leaf_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tree_log_prob, traj.log_prob[rows, traj.slot(step)], rtol=1e-6, atol=1e-4)


def test_micro_batches_train_each_transition_once_in_whole_nodes(make_trainer):
    trainer = make_trainer()
    traj = _tree(trainer, trainer.schedule.plan(0, T))
    mask = traj.plan.train_mask(8)
    halves = [torch.tensor([0, 3, 5, 6]), torch.tensor([1, 2, 4, 7])]  # minibatches that cut nodes apart
    chunks = [chunk for half in halves for chunk in traj.micro_batches(half, mask, 1)]
    for step in range(T):
        rows = torch.cat([c for s, c in chunks if s == step])
        edges = traj.edges[rows, traj.slot(step)]
        # every transition of the step exactly once, by its first leaf, whichever minibatch holds it
        assert sorted(edges.tolist()) == sorted(set(traj.edges[:, traj.slot(step)].tolist()))
        assert torch.equal(edges, SAMPLES[rows])
        for s, c in chunks:
            if s == step:
                assert len(first_of_each(traj.nodes[c, traj.slot(step)])[0]) == 1  # size 1: one node


def test_an_update_at_shared_nodes_equals_the_per_leaf_update(make_trainer):
    """One optimizer step over the tree's transitions moves the weights as the per-leaf one does."""
    def weights(trainer):
        return torch.cat([p.detach().flatten() for p in trainer.backbone.trainable_parameters()])

    moved = {}
    for per_leaf in (False, True):
        trainer = make_trainer("TrainConfig.num_minibatches = 1")
        traj = _tree(trainer, trainer.schedule.plan(0, T))
        if per_leaf:
            traj = attrs.evolve(traj, nodes=None)
        rewards = {"shapes.preference": torch.linspace(0.1, 0.9, 8) ** 2}
        advantages = trainer.objective.step_advantages(rewards, traj.group_ids, traj.edge_ids)
        before = weights(trainer)
        metrics = trainer.optimize(traj, advantages, 0)
        moved[per_leaf] = weights(trainer), metrics
        assert (moved[per_leaf][0] - before).abs().max() > 1e-6
    (tree_w, tree_m), (leaf_w, leaf_m) = moved[False], moved[True]
    assert tree_m["policy/onpolicy_ratio_dev"] < 1e-5
    assert tree_m["perf/nfe_train"] == pytest.approx(28 / 8) and leaf_m["perf/nfe_train"] == pytest.approx(
        2 * (1 + 2 + 2 + 4 + 4 + 4) / 8)  # per leaf: one row per transition (edges per tree per step)
    torch.testing.assert_close(tree_w, leaf_w, rtol=0, atol=1e-6)


def test_a_branching_plan_is_checked_against_the_grid_and_the_group_before_any_model_loads(make_trainer,
                                                                                            monkeypatch):
    from mixgrpo.plugins.backbones.toy import ToyBackbone

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ToyBackbone, "__init__", never)
    with pytest.raises(ValueError, match=r"Branching.branch_steps = \(1, 9\) splits at steps \[9\], outside the grid "
                                         r"of TrainConfig.num_steps = 6 .*raise TrainConfig.num_steps"):
        make_trainer("Branching.branch_steps = (1, 9)")
    with pytest.raises(ValueError, match=r"makes 8 leaves, but TrainConfig.group_size = 4: set "
                                         r"TrainConfig.group_size = 8"):
        make_trainer("Branching.branch_steps = (1, 3, 4)")
    with pytest.raises(ValueError, match=r"TrainConfig.shared_noise = True"):
        make_trainer("TrainConfig.shared_noise = False")
    assert Branching(branch_steps=(1, 3)).plan(0, T).branch_steps == (1, 3)  # the plan itself is fine
