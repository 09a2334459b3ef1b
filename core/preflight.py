"""Every check a run can make before any model loads, in one place.

A mistake found here costs a second; found after loading FLUX and the reward models, minutes. The
trainer calls ``check_config`` first, ``check_plans`` once its cheap components (samplers, schedule)
exist, then ``records.check_writable`` on the run directory, all before it builds the backbone or any
reward; each raises ``ValueError`` naming the binding and the fix.
"""

from __future__ import annotations

from typing import Any

from mixgrpo.core import hacking, trackers
from mixgrpo.core.config import TrainConfig
from mixgrpo.core.edits import LINE_FORMAT
from mixgrpo.core.interfaces import (
    Backbone,
    MatchingObjective,
    PolicyObjective,
    Reward,
    Sampler,
    check_objective_factory,
)
from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.types import EditPrompt


def check_config(config: TrainConfig, pm: PluginManager, num_processes: int) -> None:
    """The config's own ranges and component names (``TrainConfig.validate``), the objective's
    constructor contract (it takes the reward ``weights``), the batch layout over
    ``num_processes``, the trackers' packages and the evaluation's diversity embedding; first of
    all, before any component is built."""
    config.validate(pm)
    trackers.check(config)  # a tracker that is not installed: the extra to install
    hacking.check_config(config)  # the diversity embedding and its CLIP folder
    check_objective_factory(pm.get("objective", config.objective).factory, config.objective)
    check_batch_layout(config, num_processes)


def check_batch_layout(c: TrainConfig, world: int) -> None:
    """Whole groups on every process, and minibatches that split each process's samples evenly."""
    if c.prompts_per_iteration % world:
        n = c.prompts_per_iteration
        near = [k for k in (n // world * world, (n // world + 1) * world) if k > 0]
        raise ValueError(f"TrainConfig.prompts_per_iteration = {n} is not divisible by the number of processes "
                         f"({world}), so the processes cannot each hold whole groups: set it to a multiple of "
                         f"{world} (" + " or ".join(f'--gin "TrainConfig.prompts_per_iteration = {k}"' for k in near)
                         + f"), or launch a number of processes that divides {n}")
    local = c.prompts_per_iteration // world * c.group_size
    if local % c.num_minibatches:
        raise ValueError(f"num_minibatches={c.num_minibatches} must divide the {local} samples each process holds "
                         f"per iteration ({c.prompts_per_iteration} prompts x group_size {c.group_size} over "
                         f"{world} process(es)), so that every optimizer step averages the same number of samples")


def check_plans(c: TrainConfig, pm: PluginManager, schedule: Any, sde_sampler: Any, setup: Any,
                objective: Any = None, prompt_set: Any = None) -> None:
    """Plan the first and last iterations (plans are pure and cheap): a window that does not fit the
    grid, a trained step that is not an SDE step, a Flash grid that cannot be built, or a plan the
    objective cannot use (``check_objective_plan``); and, for an SDE sampler that cannot take the step
    into σ = 0 (CPS), every iteration, since a random window may reach the end at any (windowed plans
    are O(1))."""
    if prompt_set is not None:
        check_sources(c, pm, prompt_set)
    samples = c.prompts_per_iteration * c.group_size
    for k in sorted({0, c.iterations - 1}):
        plan = schedule.plan(k, c.num_steps, samples, seed=c.seed)
        outside = set(plan.all_train_steps()) - set(plan.sde_steps)
        if outside:
            raise ValueError(f"schedule {c.schedule!r} trains steps {sorted(outside)} at iteration {k + 1}, which "
                             "are not SDE steps: a log-prob exists only on SDE steps")
        if objective is not None:
            check_objective_plan(c, pm, objective, plan, k)
        if plan.branch_steps:
            check_tree(c, plan)
        if plan.trunk_branches:
            check_trunk(c, plan)
        setup.sigmas(plan)
    if isinstance(objective, PolicyObjective) and objective.replay is not None:
        check_replay(c, objective, [schedule.plan(k, c.num_steps, samples, seed=c.seed) for k in range(c.iterations)])
    if sde_sampler.supports_final_step:
        return
    for k in range(c.iterations):
        plan = schedule.plan(k, c.num_steps, samples, seed=c.seed)
        last = setup.sigmas(plan).numel() - 2  # the step into σ = 0 (of a Flash grid too)
        if last in plan.sde_steps and last < plan.num_steps:
            takes = sorted(n for n, e in pm.registry["sampler"].items() if _takes_final_sde_step(e.factory))
            raise ValueError(
                f"TrainConfig.sde_sampler = {c.sde_sampler!r} ({type(sde_sampler).__name__}) cannot take the grid's "
                f"last step, into σ = 0, as an SDE step (its std is 0 there, so the step has no log-prob), but "
                f"TrainConfig.schedule = {c.schedule!r} makes step {last}, the last of {last + 1}, an SDE step at "
                f"iteration {k + 1}. Use an SDE sampler that takes the last step ({', '.join(takes)}), or a windowed "
                f"schedule ('fixed', 'progressive', 'decay') whose window ends before step {last} at every iteration")


def check_tree(c: TrainConfig, plan: Any) -> None:
    """A branching plan (BranchGRPO's tree, core/tree.py) grows each group from its one initial noise
    into ``branch_factor ** len(branch_steps)`` leaves: exactly the group's samples."""
    leaves = plan.branch_factor ** len(plan.branch_steps)
    if c.group_size != leaves:
        raise ValueError(
            f"TrainConfig.schedule = {c.schedule!r} splits each group's tree in {plan.branch_factor} at steps "
            f"{plan.branch_steps}, which makes {leaves} leaves, but TrainConfig.group_size = {c.group_size}: set "
            f"TrainConfig.group_size = {leaves}, or change the schedule's branch_steps / branch_factor")
    if not c.shared_noise:
        raise ValueError(f"TrainConfig.schedule = {c.schedule!r} grows each group's tree from one initial noise: set "
                         "TrainConfig.shared_noise = True")


def check_trunk(c: TrainConfig, plan: Any) -> None:
    """A trunk plan (TempFlow-GRPO, core/trunk.py) branches ``trunk_branches`` samples off each group's
    one ODE trunk at every branch step: exactly the group's samples, from one initial noise, on the
    uncompressed grid."""
    size = plan.trunk_branches * len(plan.sde_steps)
    if c.group_size != size:
        raise ValueError(
            f"TrainConfig.schedule = {c.schedule!r} branches {plan.trunk_branches} samples off each group's trunk at "
            f"each of the steps {list(plan.sde_steps)}, which makes {size} samples per group, but "
            f"TrainConfig.group_size = {c.group_size}: set TrainConfig.group_size = {size}, or change the "
            f"schedule's branch steps / branches")
    if not c.shared_noise:
        raise ValueError(f"TrainConfig.schedule = {c.schedule!r} walks each group's one initial noise as its trunk: "
                         "set TrainConfig.shared_noise = True")
    if c.compression is not None:
        raise ValueError(f"TrainConfig.schedule = {c.schedule!r} walks the whole grid with every branch, which a "
                         f"compressed grid (TrainConfig.compression = {c.compression}) does not have: set "
                         "TrainConfig.compression = None")


def check_replay(c: TrainConfig, objective: PolicyObjective, plans: list[Any]) -> None:
    """An off-policy objective (``PolicyObjective.replay``, core/replay.py) gives a group's last row a stored
    trajectory whose steps 0 … τ−1 are reused: they must be SDE steps at every iteration (stored with
    their log-probs), on a grid every iteration walks the same, outside any tree, trunk or shared prefix."""
    name, tau = type(objective).__name__, objective.replay.truncate_step
    what = f"TrainConfig.objective = {c.objective!r} ({name}) replays stored trajectories"
    if not 1 <= tau < c.num_steps:
        raise ValueError(f"{what} up to {name}.truncate_step = {tau}, which must lie in 1 … {c.num_steps - 1} on the "
                         f"grid of TrainConfig.num_steps = {c.num_steps} (the current policy draws steps τ … T−1)")
    if objective.uses_step_moments:
        raise ValueError(f"{what}, whose stored steps keep no step means, which GRPO-Guard and the noise-aware "
                         f"weighting need: set {name}.guard = False and {name}.noise_weight = 0")
    if c.shared_noise and c.share_prefix:
        raise ValueError(f"{what}, whose replayed row does not walk its group's shared prefix: set "
                         "TrainConfig.share_prefix = False (or TrainConfig.shared_noise = False)")
    if c.compression is not None:
        raise ValueError(f"{what} on one grid for every iteration: set TrainConfig.compression = None")
    for k, plan in enumerate(plans):
        missing = sorted(set(range(tau)) - set(plan.sde_steps))
        if plan.branch_steps or plan.trunk_branches or missing:
            why = (f"makes steps {missing} ODE steps" if missing else "walks a tree or a trunk")
            raise ValueError(f"{what}, reusing steps 0 … {tau - 1} as SDE transitions, but TrainConfig.schedule = "
                             f"{c.schedule!r} {why} at iteration {k + 1}: use a schedule whose SDE steps include "
                             f"0 … {tau - 1} at every iteration (FlowGRPO's 'all'), or a smaller {name}.truncate_step")


def _takes_final_sde_step(factory: Any) -> bool:
    return (isinstance(factory, type) and issubclass(factory, Sampler) and factory.stochastic
            and factory.supports_final_step)


def check_objective_plan(c: TrainConfig, pm: PluginManager, objective: Any, plan: Any, k: int) -> None:
    """A forward-process objective (``MatchingObjective``) trains on final samples: an SDE step would be
    sampled for nothing, and an ODE walk from a group's shared noise gives one image G times. A GRPO
    objective trains on SDE transitions: a plan without any trains nothing."""
    name = f"TrainConfig.objective = {c.objective!r} ({type(objective).__name__})"
    if isinstance(objective, MatchingObjective):
        if plan.sde_steps:
            raise ValueError(f"{name} is a forward-process objective: it trains on the rollout's final samples and "
                             f"ignores SDE steps, but TrainConfig.schedule = {c.schedule!r} makes steps "
                             f"{list(plan.sde_steps)} SDE steps at iteration {k + 1}. Use --gin "
                             "\"TrainConfig.schedule = 'ode'\" (every step with the ODE solvers), as "
                             "experiments/methods/diffusionnft.gin does")
        if c.shared_noise:
            raise ValueError(f"{name} samples with the ODE only, so a group that shares its initial noise holds "
                             f"{c.group_size} copies of one image and no reward varies within it: set "
                             "--gin \"TrainConfig.shared_noise = False\"")
    elif not plan.all_train_steps():
        matching = sorted(n for n, e in pm.registry["objective"].items()
                          if isinstance(e.factory, type) and issubclass(e.factory, MatchingObjective))
        raise ValueError(f"{name} trains SDE transitions, but TrainConfig.schedule = {c.schedule!r} trains no step at "
                         f"iteration {k + 1}: choose a schedule with an SDE window, or a forward-process objective "
                         f"({', '.join(matching) or 'none registered'}) for an ODE-only rollout")


def check_sources(c: TrainConfig, pm: PluginManager, prompt_set: Any) -> None:
    """An editing backbone (``Backbone.uses_source_images``) needs a prompt set whose items carry a
    source image (``EditPrompt``) and a text-only one refuses them; a reward that scores against the
    source image (``Reward.uses_source_images``: an edit reward) needs them too. Found here, before
    the model loads, not after iterations of rollouts and rewards that could do nothing right."""
    first = prompt_set("eval", 1, c.seed)
    edits = bool(first) and isinstance(first[0], EditPrompt)
    backbone = pm.get("backbone", c.backbone).factory
    declares = isinstance(backbone, type) and issubclass(backbone, Backbone)  # what a plain factory does is unknown
    editing = declares and backbone.uses_source_images
    if first and editing and not edits:
        raise ValueError(f"TrainConfig.backbone = {c.backbone!r} edits a source image per prompt, but "
                         f"TrainConfig.prompt_set = {c.prompt_set!r} gives plain text prompts: use a prompt set whose "
                         "items carry a source image (TrainConfig.prompt_set = 'edit', a JSONL of "
                         f"{LINE_FORMAT} lines or a folder of images with same-named .txt instructions)")
    if edits and declares and not editing:
        raise ValueError(f"TrainConfig.prompt_set = {c.prompt_set!r} gives edit prompts (an instruction with a source "
                         f"image), but TrainConfig.backbone = {c.backbone!r} generates from text alone and would "
                         "ignore the source images: use an editing backbone (one that declares uses_source_images, "
                         "e.g. 'flux_kontext'), or a text prompt set")
    asking = [name for name in dict.fromkeys([*c.rewards, *c.eval_rewards])
              if _uses_sources(pm.get("reward", name).factory)]
    if not asking:
        return
    if first and not edits:
        raise ValueError(f"reward(s) {', '.join(map(repr, asking))} score each image against its source image, but "
                         f"TrainConfig.prompt_set = {c.prompt_set!r} gives plain text prompts: use a prompt set whose "
                         "items carry a source image (EditPrompt items, e.g. a JSONL of image path + instruction; "
                         "`mixgrpo plugins` lists the prompt sets), or drop those rewards")


def _uses_sources(factory: Any) -> bool:
    return isinstance(factory, type) and issubclass(factory, Reward) and factory.uses_source_images
