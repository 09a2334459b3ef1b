"""The trainer: one loop for every method, read top to bottom.

    for each iteration k:
        1. plan        which steps of the σ grid are SDE steps, which are trained   (the schedule)
        2. rollout     trajectories of this process's samples, chunk by chunk         (backbone + samplers)
        3. reward      each chunk's images scored as soon as they are decoded         (the rewards)
        4. advantages  per group, over every process's samples                        (the objective)
        5. optimize    minibatches of (sample, trained step) pairs, one step each     (the objective)
        6. log         one row in metrics.jsonl (and the trackers); evaluation and grids when due
        7. checkpoint  when due, after the last iteration, and when SIGTERM or Ctrl-C asks the run to stop

What differs between FlowGRPO, DanceGRPO and MixGRPO lives in the plugins a gin recipe selects,
never in branches here. Around the loop: every check before a model loads is
``mixgrpo.core.preflight``; the layout over processes ``mixgrpo.core.parallel.Parallel``; the run
directory and its records ``mixgrpo.core.records``; reward scoring and the decision to stop on a
failing reward ``mixgrpo.core.scoring``; the metric names ``mixgrpo.core.metrics``. Iterations are
numbered from 1 in every message and record (iteration k of the loop is logged as k + 1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from accelerate import Accelerator

from mixgrpo.core import checkpoint as ckpt
from mixgrpo.core import evaluation, matching, preflight, records, scoring, trackers, tree
from mixgrpo.core import metrics as m
from mixgrpo.core.advantages import local_rows
from mixgrpo.core.config import TrainConfig
from mixgrpo.core.ema import EMA
from mixgrpo.core.interfaces import MatchingObjective, PolicyObjective
from mixgrpo.core.metrics import format_value
from mixgrpo.core.parallel import Parallel, make_accelerator, peak_mem_gb
from mixgrpo.core.plugins import PluginManager, get_plugin_manager, make_sampler
from mixgrpo.core.progress import progress_bar
from mixgrpo.core.replay import ReplayBuffer
from mixgrpo.core.rollout import SamplingSetup, keyed_generator, rollout
from mixgrpo.core.scoring import ChunkScorer, RewardFailure, RewardWatch
from mixgrpo.core.signals import stop_on_signals
from mixgrpo.core.steps import OptimizerSteps
from mixgrpo.core.types import StepMoments, StepPlan, StepResult, Trajectories

log = logging.getLogger(__name__)


class Trainer:
    """Runs one experiment described by ``TrainConfig`` (gin) in ``config.output_dir``."""

    def __init__(self, config: TrainConfig, pm: PluginManager | None = None,
                 accelerator: Accelerator | None = None) -> None:
        self.config = c = config
        self.pm = pm or get_plugin_manager()
        self.out = Path(c.output_dir)
        self.accelerator = accelerator or make_accelerator(self.out, trackers.selected(c))
        preflight.check_config(c, self.pm, self.accelerator.num_processes)
        self.parallel = Parallel(self.accelerator, c.parallelism)
        #: the iteration-0 evaluation (``evaluation.base``; ``mixgrpo compare`` shares one between runs)
        self.base_evaluation: Callable[[Trainer, dict[str, Any]], None] = evaluation.base
        #: the experiment file and command-line bindings (``mixgrpo train`` sets it; recorded for --resume)
        self.launch: dict[str, Any] | None = None
        # the cheap components first, and every check that needs no model: a mistake stops the run
        # before minutes of loading FLUX and the reward models. Each sampler is built in the gin
        # scope of its role: `post/DPMSolverPP.order = 1` reaches the post-window solver alone
        self.sde_sampler = make_sampler(self.pm, "sde", c.sde_sampler)
        self.pre_solver = make_sampler(self.pm, "pre", c.pre_solver)
        self.post_solver = make_sampler(self.pm, "post", c.post_solver)
        self.eval_solver = make_sampler(self.pm, "eval", c.eval_solver)
        self.schedule = self.pm.create("schedule", c.schedule)
        self.objective = self.pm.create("objective", c.objective, weights=dict(c.rewards))
        # GRPO-Guard's loss takes the step moments: the rollout then keeps each SDE step's mean
        self.wants_moments = isinstance(self.objective, PolicyObjective) and self.objective.uses_step_moments
        spec = self.objective.replay if isinstance(self.objective, PolicyObjective) else None
        self.replay = ReplayBuffer(spec, type(self.objective).__name__) if spec is not None else None
        if self.replay is not None and self.parallel.sharded and self.parallel.num_processes > 1:
            raise ValueError(
                f"TrainConfig.objective = {c.objective!r} replays stored trajectories, so processes roll out "
                "different numbers of fresh and replayed samples, but FSDP needs every process to make the same "
                "model calls: train it with DDP (TrainConfig.parallelism = 'ddp', experiments/accelerate/ddp.yaml)")
        self.prompt_set = self.pm.create("prompt_set", c.prompt_set)
        self.setup = SamplingSetup(num_steps=c.num_steps, shift=c.shift, grid=c.grid, mu=c.mu,
                                   shift_terminal=c.shift_terminal, compression=c.compression,
                                   shared_noise=c.shared_noise, share_prefix=c.share_prefix)
        # evaluation and sample grids: the ODE on their own grid (FlowGRPO evaluates SD3.5 at 40 steps)
        self.eval_setup = attrs.evolve(self.setup, num_steps=c.eval_num_steps or c.num_steps, compression=None)
        preflight.check_plans(c, self.pm, self.schedule, self.sde_sampler, self.setup, self.objective,
                            self.prompt_set)
        records.check_writable(self.out)
        # then the models
        self.backbone = self.pm.create("backbone", c.backbone)
        if self.replay is not None:  # its full size, before the reward models load
            self.replay.check_memory(self.backbone.latent_shape(), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.rewards = {name: self.pm.create("reward", name) for name in c.rewards}
        self.eval_only_rewards = {name: self.pm.create("reward", name) for name in c.eval_rewards
                                  if name not in self.rewards}
        evaluation.freeze_base(self)  # the base weights (KL term, eval/kl_base), before any resume or update
        self.parallel.shard(self.backbone)
        params = self.backbone.trainable_parameters()
        if not params:
            raise ValueError(f"backbone {c.backbone!r} has no trainable parameters")
        self.optimizer = self.parallel.prepare(self.backbone, torch.optim.AdamW(
            params, lr=c.learning_rate, weight_decay=c.weight_decay, betas=tuple(c.adam_betas)))
        self.ema = EMA(self.backbone.trainable_parameters(), c.ema_decay, c.ema_interval) if c.ema_decay else None
        self.reward_watch = RewardWatch(list(c.rewards), c.prompts_per_iteration * c.group_size,
                                        c.max_failed_iterations)
        self.start_iteration = 0
        self.stopped: str | None = None  # why the last train() ended early (a signal), if it did

    # == the loop ====================================================================================
    def train(self, start: str = "new") -> list[dict[str, float]]:
        """Run iterations ``start_iteration + 1 .. iterations``; returns their metrics rows.

        ``start`` says what to do with ``output_dir`` (``records.open_run``): ``"new"``, ``"resume"``
        or ``"overwrite"``. SIGTERM or a first Ctrl-C (on any process) stops the run at the end of the
        current iteration with a checkpoint; ``stopped`` then tells why. A trained reward that keeps
        failing, or is unavailable, stops it with a ``RewardFailure`` after checkpointing the last
        iteration that trained.
        """
        with records.storage_errors(self.out):
            return self._train(start)

    def _train(self, start: str) -> list[dict[str, float]]:
        c, acc = self.config, self.accelerator
        self.stopped = None
        self.start_iteration = records.open_run(self.out, start, acc, self._restore, self.launch)
        self.trackers = trackers.start(acc, self.out, self.start_iteration, c)  # a resume: the same tracker run
        history: list[dict[str, float]] = []
        if self.start_iteration == 0 and (c.eval_every or c.sample_every):
            base_row: dict[str, Any] = {m.ITERATION: 0}
            self.base_evaluation(self, base_row)
            self._log(base_row)
        bar = progress_bar(range(self.start_iteration, c.iterations), desc=f"{c.objective}", unit="it",
                           disable=not (c.progress and acc.is_main_process), initial=self.start_iteration,
                           total=c.iterations)
        with stop_on_signals() as stop:
            for k in bar:
                n, last = k + 1, k + 1 == c.iterations  # iteration n (1-based), as logged
                metrics, failure = self._iterate(k)  # 1.-5. plan, rollout, reward, advantages, optimize
                row = {m.ITERATION: n, **metrics}
                evaluation.when_due(self, n, row, last)  # 6. log: evaluation and grids first, then the row
                self._log(row)
                history.append(row)
                stop.extend(evaluation.hacking_stop(self, row))  # stops as a signal does (stop_on_hacking)
                if failure is not None:  # recorded first, then the run stops with the reward's error
                    raise self._stop_for_reward(failure, n - self.reward_watch.streak)
                self.pm.on_iteration_end(trainer=self, iteration=n, metrics=row)
                bar.set_postfix(reward=format_value(row[m.reward(next(iter(c.rewards)), "mean")]),
                                s_it=f"{row[m.ITERATION_S]:.2f}", refresh=False)
                # 7. checkpoint: when due, after the last iteration, and before stopping for a signal
                #    (every process agrees to stop, also those the signal did not reach); not within
                #    failed iterations, which trained nothing (see _stop_for_reward)
                halt = not self.parallel.all_processes(not stop)
                due = c.checkpoint_every and n % c.checkpoint_every == 0 and not self.reward_watch.streak
                if halt or last or due:
                    self._checkpoint(n)
                if halt:
                    why = stop[0] if stop else "a stop signal to another process"
                    self.stopped = f"stopped by {why} after iteration {n} (checkpoint saved)"
                    break
        self.trackers.finish()  # flush and close the tracker runs
        return history

    def iteration(self, k: int) -> dict[str, float]:
        """One iteration (0-based ``k``) of plan → rollout → reward → advantages → optimize; returns
        its metrics (every process the same), or raises the ``RewardFailure`` that would stop a run."""
        metrics, failure = self._iterate(k)
        if failure is not None:
            raise failure
        return metrics

    def _iterate(self, k: int) -> tuple[dict[str, float], RewardFailure | None]:
        c = self.config
        t0 = time.perf_counter()
        # 1. plan: this process's samples (whole groups), their SDE steps and trained steps
        prompts, group_ids, sample_ids = self.local_batch(k)
        replayed = 0
        if self.replay is not None:  # a group whose prompt has a stored trajectory replays it in its last row
            prompts, group_ids, sample_ids, replayed = self.replay.arrange(prompts, group_ids, sample_ids, k)
        plan = self.plan(k, sample_ids)
        # 2. rollout: chunks of samples down the σ grid, SDE on the plan's steps and ODE elsewhere;
        # 3. reward: each chunk's images scored as soon as decoded (in the background with
        #    overlap_rewards, while the next chunk rolls out)
        self.backbone.module.eval()
        with ChunkScorer(self.rewards, prompts, background=c.overlap_rewards) as scorer:
            if self.replay is None:
                traj = self.rollout_rows(prompts, group_ids, sample_ids, plan, k, scorer.submit)
            else:  # the fresh rows, then the replayed ones from their stored prefixes (core/replay.py)
                traj = self.replay.rollout(self, prompts, group_ids, sample_ids, plan, replayed, k, scorer.submit)
            t1 = time.perf_counter()
            scores = scorer.wait()
        metrics = self.reward_statistics(scores, traj)
        if self.replay is not None:
            self.replay.admit(self, traj, scores, k)
            metrics.update(self.replay.metrics(len(traj)))
        # 4. advantages: per group over every process's samples; this process's rows
        advantages = self.advantages(scores, traj, k)
        t2 = time.perf_counter()
        # 5. optimize: minibatches of (sample, trained step) pairs, one optimizer step each
        self.backbone.module.train()
        idle, failure = self.reward_watch.check(k + 1, metrics, scorer.errors, self.parallel.all_processes)
        if idle:  # no signal: nothing to train on (Adam would still move the weights)
            metrics.update({**dict.fromkeys(m.POLICY, float("nan")), m.NFE_TRAIN: 0.0,
                            m.SKIPPED_STEPS: float(c.num_minibatches)})
        else:
            metrics.update(self.optimize(traj, advantages, k))
        t3 = time.perf_counter()
        # what the iteration cost (scoring done inline during the rollout counts as reward time)
        window = plan.window or (-1, 0)
        metrics.update({
            m.WINDOW_START: float(window[0]), m.WINDOW_SIZE: float(window[1]),
            m.NFE_ROLLOUT: float(traj.nfe),
            m.ROLLOUT_S: t1 - t0 - scorer.inline_s, m.REWARD_S: t2 - t1 + scorer.inline_s, m.TRAIN_S: t3 - t2,
            m.ITERATION_S: t3 - t0, m.PEAK_MEM_GB: peak_mem_gb(),
        })
        return metrics, failure

    # == 1. plan =====================================================================================
    def local_batch(self, iteration: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """This process's prompts, global group ids and global sample ids for ``iteration`` (0-based)."""
        c, acc = self.config, self.accelerator
        prompts = self.prompt_set("train", c.prompts_per_iteration, c.seed, iteration=iteration)
        groups = [g for g in range(c.prompts_per_iteration) if g % acc.num_processes == acc.process_index]
        group_ids = torch.tensor([g for g in groups for _ in range(c.group_size)])
        sample_ids = torch.tensor([g * c.group_size + j for g in groups for j in range(c.group_size)])
        return [prompts[g] for g in group_ids.tolist()], group_ids, sample_ids

    def plan(self, iteration: int, sample_ids: torch.Tensor) -> StepPlan:
        """The schedule's plan of ``iteration`` (0-based); of a per-sample plan, the rows of ``sample_ids``."""
        c = self.config
        plan = self.schedule.plan(iteration, c.num_steps, c.prompts_per_iteration * c.group_size, seed=c.seed)
        if plan.per_sample:
            plan = attrs.evolve(plan, train_steps=tuple(plan.train_steps[int(s)] for s in sample_ids))
        return plan

    # == 2. rollout ==================================================================================
    def rollout_rows(self, prompts: list[str], group_ids: torch.Tensor, sample_ids: torch.Tensor, plan: StepPlan,
                     iteration: int, on_images: Callable[[torch.Tensor, slice], None] | None = None) -> Trajectories:
        """``core.rollout.rollout`` of these samples under ``plan`` with the run's samplers and settings."""
        c = self.config
        return rollout(self.backbone, prompts, group_ids, sample_ids, plan, setup=self.setup,
                       sde_sampler=self.sde_sampler, pre_solver=self.pre_solver, post_solver=self.post_solver,
                       seed=c.seed, iteration=iteration, batch_size=c.rollout_batch_size, on_images=on_images,
                       keep_means=self.wants_moments)

    # == 3. reward and 4. advantages ================================================================
    def reward_statistics(self, scores: dict[str, torch.Tensor], traj: Trajectories) -> dict[str, float]:
        """``reward/<name>/...`` over every process's samples (``mixgrpo.core.scoring.statistics``)."""
        gather = self.parallel.gather
        return scoring.statistics({name: gather(s) for name, s in scores.items()}, gather(traj.group_ids))

    def advantages(self, scores: dict[str, torch.Tensor], traj: Trajectories, iteration: int | None = None
                   ) -> torch.Tensor:
        """The objective's advantages over every process's samples (groups are compared whole), then
        this process's rows, in the order of ``traj`` (the objective of ``iteration``, 0-based, when given:
        ``Objective.at_iteration``). A reward that declares ``higher_is_better = False`` enters negated:
        training always raises the advantage."""
        gather = self.parallel.gather
        everywhere = scoring.oriented(self.rewards, {name: gather(s) for name, s in scores.items()})
        objective = self.objective if iteration is None else self.objective.at_iteration(iteration)
        adv = tree.advantages(objective, everywhere, gather(traj.group_ids), gather(traj.edge_ids),
                              log_prob=lambda: gather(traj.log_prob))
        adv = adv[local_rows(gather(traj.sample_ids), traj.sample_ids)]
        if traj.weight is not None:  # a replayed sample's importance weight (core/replay.py)
            adv = adv * traj.weight.reshape(-1, *[1] * (adv.dim() - 1)).to(adv)
        return adv

    # == 5. optimize =================================================================================
    def optimize(self, traj: Trajectories, advantages: torch.Tensor, iteration: int) -> dict[str, float]:
        """Optimizer steps over the iteration's samples; returns the policy metrics.

        The samples are split into ``num_minibatches`` minibatches (one optimizer step each). Each step
        averages the loss over its (sample, trained step) pairs. The first minibatch runs before any
        update, so its ratios must be 1: that is the on-policy check (``policy/onpolicy_ratio_dev``).
        A minibatch whose loss or gradient norm is not finite takes no optimizer step (its gradient
        never reaches the weights or the optimizer state) and is counted in ``policy/skipped_steps``.
        """
        c, objective = self.config, self.objective.at_iteration(iteration)
        if isinstance(objective, MatchingObjective):  # trains on final samples, not on transitions
            return matching.optimize(self, traj, advantages, iteration)
        n = len(traj)
        mask = traj.plan.train_mask(n)
        for k, step in enumerate(traj.sde_steps):  # a NaN advantage: a transition the objective pruned
            mask[:, step] &= ~torch.isnan(advantages[:, k]).cpu()
        order = torch.randperm(n, generator=keyed_generator(c.seed, iteration, "minibatches"))
        steps, evaluations = OptimizerSteps(self, iteration), 0

        def losses(step: int, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            res, kl = self._step_result(traj, step, rows)
            old, adv = (t[rows, traj.slot(step)].to(res.log_prob.device) for t in (traj.log_prob, advantages))
            extra = {"moments": StepMoments(res.mean, traj.mean[rows, traj.slot(step)].to(res.log_prob.device),
                                            res.std)} if self.wants_moments else {}
            return objective.loss(res.log_prob, old, adv, kl, **extra)

        for mb_index, mb in enumerate(order.chunk(c.num_minibatches)):
            chunks = traj.micro_batches(mb.sort().values, mask, c.micro_batch_size)
            total = sum(len(rows) for _, rows in chunks)
            if total:
                steps.step(mb_index, chunks, total, losses)
                evaluations += sum(len(traj.model_rows(step, rows)[0]) for step, rows in chunks)
        calls = self.backbone.calls_per_velocity * (2 if objective.uses_reference else 1)
        return steps.metrics(nfe_train=calls * evaluations / max(n, 1))

    def _step_result(self, traj: Trajectories, step: int, rows: torch.Tensor) -> tuple[StepResult, Any]:
        """The SDE step of the stored transitions at ``step`` under the current weights (its log-probs
        with grad), and the KL to the frozen reference when the objective uses one. At the step whose input a
        group shares (``traj.shared_step``) the model runs once per group: autograd sums the
        gradients of the group's rows through the expansion, as if each row had run it."""
        device = self.backbone.device
        slot = traj.slot(step)
        calls, expand = traj.model_rows(step, rows)
        x_call = traj.x[calls, slot].to(device)
        cond = traj.cond.select(calls).to(device)
        sigma = torch.full((len(calls),), float(traj.sigmas[step]), device=device)

        def velocity() -> torch.Tensor:
            v = self.backbone.velocity(x_call, sigma, cond)
            return v if expand is None else v[expand.to(device)]

        x = x_call if expand is None else x_call[expand.to(device)]
        x_next = traj.x_next[rows, slot].to(device)
        res = self.sde_sampler.step(x, velocity(), traj.sigmas, step, prev_sample=x_next)
        kl = None
        if self.objective.uses_reference:
            with torch.no_grad(), self.backbone.reference():
                v_ref = velocity()
            ref = self.sde_sampler.step(x, v_ref, traj.sigmas, step, prev_sample=x_next)
            kl = self.objective.kl(res, ref, traj.sigmas, step)
        return res, kl

    @property
    def ratio_tolerance(self) -> float:
        """The on-policy ratio deviation that warns: ``TrainConfig.ratio_tolerance``, by default a
        tenth of the objective's clip range (a larger deviation would clip transitions unseen)."""
        c = self.config
        return c.ratio_tolerance if c.ratio_tolerance is not None else self.objective.clip_range / 10

    # == 6. log: held-out evaluation, sample grids, metrics rows ===================================
    def evaluate(self, scores: dict[str, list[float]] | None = None) -> dict[str, float]:
        return evaluation.evaluate(self, scores)

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        return evaluation.weights(self)

    def _log(self, metrics: dict[str, Any]) -> None:
        self.trackers.log(metrics)  # its numbers, and the grid drawn for its iteration
        if self.accelerator.is_main_process:
            records.append_row(self.out, records.METRICS, metrics)

    # == 7. checkpoint, and the run directory ========================================================
    def _checkpoint(self, iteration: int) -> None:
        path = ckpt.save(self, self.out / "checkpoints", iteration, keep_last=self.config.keep_last)
        if self.accelerator.is_main_process:
            self.pm.on_checkpoint(trainer=self, path=path)

    def _restore(self, root: Path) -> int:
        """Load the latest checkpoint under ``root``; the config's step sizes replace the recorded
        ones (a resume may change them). Returns the checkpoint's iteration."""
        first = ckpt.resume(self, root)
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = self.config.learning_rate, self.config.weight_decay
        return first

    def _stop_for_reward(self, failure: RewardFailure, good: int) -> RewardFailure:
        """Checkpoint the last iteration that trained (``good``; the failed ones after it trained
        nothing, so the weights are its weights) and return the failure, its message saying where
        the run can continue from."""
        root = self.out / "checkpoints"
        found = ckpt.latest(root)
        if good > 0 and (found is None or ckpt.read_state(found)["iteration"] < good):
            self._checkpoint(good)
            found = ckpt.latest(root)
        where = (f"iterations up to {good} are checkpointed in {found}" if found else
                 "no iteration completed, so nothing was checkpointed")
        stopped = RewardFailure(f"{failure}. The run stopped; {where}")
        stopped.__cause__ = failure.__cause__
        return stopped

    def close(self) -> None:
        """End of the process's work: every rank reaches here, then the process group is torn down
        (a gloo/NCCL group left to the interpreter's exit can abort a rank with ``terminate called
        without an active exception``)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.state.destroy_process_group()  # trackers were finished by train()
