"""The trainer: one loop for every method, read top to bottom.

    for each iteration k:
        1. plan        which steps of the σ grid are SDE steps, which are trained   (the schedule)
        2. rollout     trajectories of this process's samples, chunk by chunk         (backbone + samplers)
        3. reward      each chunk's images scored as soon as they are decoded         (the rewards)
        4. advantages  per group, over every process's samples                        (the objective)
        5. optimize    minibatches of (sample, trained step) pairs, one step each     (the objective)
        6. log         one row in metrics.jsonl (and TensorBoard); evaluation and grids when due
        7. checkpoint  when due, and when SIGTERM or Ctrl-C asks the run to stop

What differs between FlowGRPO, DanceGRPO and MixGRPO lives in the plugins a gin recipe selects,
never in branches here. Reward scoring is ``mixgrpo.core.scoring`` (pure functions), the metric
names ``mixgrpo.core.metrics``, the run directory's records ``mixgrpo.core.records``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import gin
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from mixgrpo.core import base_eval, records, scoring
from mixgrpo.core import checkpoint as ckpt
from mixgrpo.core import metrics as m
from mixgrpo.core.advantages import local_rows
from mixgrpo.core.config import TrainConfig
from mixgrpo.core.ema import EMA
from mixgrpo.core.interfaces import Reward, RewardUnavailable
from mixgrpo.core.parallel import clip_grad_norm, resolve_parallelism, shard
from mixgrpo.core.plugins import PluginManager, get_plugin_manager, make_sampler
from mixgrpo.core.progress import progress_bar
from mixgrpo.core.report import format_value
from mixgrpo.core.rollout import SamplingSetup, first_of_each, keyed_generator, rollout, sample_ode
from mixgrpo.core.scoring import RewardFailure
from mixgrpo.core.types import StepPlan, Trajectories

log = logging.getLogger(__name__)
#: what ``Trainer.train`` may do with a run directory that already holds a run
START_MODES = ("new", "resume", "overwrite")


class Trainer:
    """Runs one experiment described by ``TrainConfig`` (gin) in ``config.output_dir``."""

    def __init__(self, config: TrainConfig, pm: PluginManager | None = None,
                 accelerator: Accelerator | None = None) -> None:
        self.config = c = config
        self.pm = pm or get_plugin_manager()
        config.validate(self.pm)
        self.out = Path(config.output_dir)
        self.accelerator = accelerator or _make_accelerator(config, self.out)
        self._tensorboard = bool(self.accelerator.log_with)
        self.base_cache: Path | None = None  # a folder of shared base evaluations (mixgrpo compare sets it)
        #: the experiment file and command-line bindings (``mixgrpo train`` sets it; recorded for --resume)
        self.launch: dict[str, Any] | None = None
        # the cheap components first, and every check that needs no model: a mistake stops the run
        # before minutes of loading FLUX and the reward models
        # each in the gin scope of its role: `post/DPMSolverPP.order = 1` reaches the post-window solver alone
        self.sde_sampler = make_sampler(self.pm, "sde", c.sde_sampler)
        self.pre_solver = make_sampler(self.pm, "pre", c.pre_solver)
        self.post_solver = make_sampler(self.pm, "post", c.post_solver)
        self.eval_solver = make_sampler(self.pm, "eval", c.eval_solver)
        self.schedule = self.pm.create("schedule", c.schedule)
        self.objective = self.pm.create("objective", c.objective, weights=dict(c.rewards))
        self.prompt_set = self.pm.create("prompt_set", c.prompt_set)
        self.setup = SamplingSetup(num_steps=c.num_steps, shift=c.shift, grid=c.grid, mu=c.mu,
                                   compression=c.compression, shared_noise=c.shared_noise,
                                   share_prefix=c.share_prefix)
        # evaluation and sample grids: the ODE on their own grid (FlowGRPO evaluates SD3.5 at 40 steps)
        self.eval_setup = attrs.evolve(self.setup, num_steps=c.eval_num_steps or c.num_steps, compression=None)
        _check_batch_layout(c, self.accelerator.num_processes)
        self._check_plans()
        records.check_writable(self.out)
        # then the models
        self.backbone = self.pm.create("backbone", c.backbone)
        self.rewards = {name: self.pm.create("reward", name) for name in c.rewards}
        self.eval_only_rewards = {name: self.pm.create("reward", name) for name in c.eval_rewards
                                  if name not in self.rewards}
        if self.objective.uses_reference:
            self.backbone.freeze_reference()  # the base weights, before any resume or update
        self.parallelism = resolve_parallelism(
            c.parallelism, self.accelerator.distributed_type == DistributedType.FSDP)
        if self.parallelism == "fsdp":
            self._shard_backbone()
        params = self.backbone.trainable_parameters()
        if not params:
            raise ValueError(f"backbone {c.backbone!r} has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay,
                                           betas=tuple(c.adam_betas))
        if self.parallelism == "ddp":
            self.backbone.module, self.optimizer = self.accelerator.prepare(self.backbone.module, self.optimizer)
        self.ema = EMA(self.backbone.trainable_parameters(), c.ema_decay, c.ema_interval) if c.ema_decay else None
        self.start_iteration = 0
        self.stopped: str | None = None  # why the last train() ended early (a signal), if it did
        self._failed_streak = 0  # consecutive iterations in which a trained reward scored nothing
        self._failure: RewardFailure | None = None

    # == the loop ====================================================================================
    def train(self, start: str = "new") -> list[dict[str, float]]:
        """Run iterations ``start_iteration .. iterations - 1``; returns their metrics rows.

        ``start`` says what to do with ``output_dir`` (``mixgrpo train``'s flags): ``"new"`` refuses
        a directory that holds a run, ``"overwrite"`` deletes that run first, ``"resume"`` continues
        it from its latest checkpoint (refusing a config that changes the experiment, see
        ``mixgrpo.core.records``; from iteration 0 when there is none). SIGTERM or a first Ctrl-C
        stops the run at the end of the current iteration with a checkpoint; ``stopped`` then tells
        why.
        """
        with records.storage_errors(self.out):
            return self._train(start)

    def _train(self, start: str) -> list[dict[str, float]]:
        c, acc = self.config, self.accelerator
        self.start_iteration, self.stopped = self._open_run(start), None
        self._start_trackers()
        history: list[dict[str, float]] = []
        if self.start_iteration == 0 and (c.eval_every or c.sample_every):
            base_row: dict[str, Any] = {m.ITERATION: 0}
            base_eval.evaluate_base(self, base_row, self.base_cache)  # shared with identical runs
            self._log(base_row)
        bar = progress_bar(range(self.start_iteration, c.iterations), desc=f"{c.objective}", unit="it",
                   disable=not (c.progress and acc.is_main_process), initial=self.start_iteration,
                   total=c.iterations)
        with _stop_on_signals() as stop:
            for k in bar:
                # 1.-5. plan, rollout, reward, advantages, optimize
                row = {m.ITERATION: k + 1, **self.iteration(k)}
                # 6. log: held-out evaluation and the sample grid when due (always after the last
                #    iteration), then the row
                last = k + 1 == c.iterations
                if c.eval_every and ((k + 1) % c.eval_every == 0 or last):
                    self.record_evaluation(k + 1, row)
                if c.sample_every and ((k + 1) % c.sample_every == 0 or last):
                    self.draw_grid(k + 1)
                self._log(row)
                history.append(row)
                if self._failure is not None:  # recorded first, then the run stops with the reward's error
                    raise self._stop_for_reward(k + 1 - self._failed_streak)
                self.pm.on_iteration_end(trainer=self, iteration=k + 1, metrics=row)
                bar.set_postfix(reward=format_value(row[m.reward(next(iter(c.rewards)), "mean")]),
                                s_it=f"{row[m.ITERATION_S]:.2f}", refresh=False)
                # 7. checkpoint: when due, after the last iteration, and before stopping for a signal
                #    (every process agrees to stop, also those the signal did not reach)
                halt = not self.all_processes(not stop)
                due = c.checkpoint_every and (k + 1) % c.checkpoint_every == 0 and not self._failed_streak
                if halt or last or due:  # (not within failed iterations: see _stop_for_reward)
                    self._checkpoint(k + 1)
                if halt:
                    why = stop[0] if stop else "a stop signal to another process"
                    self.stopped = f"stopped by {why} after iteration {k + 1} (checkpoint saved)"
                    break
        for tracker in acc.trackers:
            tracker.finish()  # flush and close the TensorBoard writer
        if acc.is_main_process and not self.stopped:
            from mixgrpo.core.model_card import write_model_card

            # README.md: what was trained and how it scores, to publish as is
            write_model_card(self.out, c, self.backbone, self.prompt_set("eval", 1, c.seed)[0])
        return history

    def iteration(self, k: int) -> dict[str, float]:
        """One iteration (0-based ``k``) of plan → rollout → reward → advantages → optimize; returns
        its metrics (every process the same)."""
        c = self.config
        t0 = time.perf_counter()
        # 1. plan: this process's samples (whole groups), their SDE steps and trained steps
        prompts, group_ids, sample_ids = self.local_batch(k)
        plan = self.plan(k, sample_ids)
        # 2. rollout: chunks of samples down the σ grid, SDE on the plan's steps and ODE elsewhere;
        # 3. reward: each chunk's images scored as soon as decoded (in the background with
        #    overlap_rewards, while the next chunk rolls out)
        self.backbone.module.eval()
        with _ChunkScorer(self.rewards, prompts, _reward_thread() if c.overlap_rewards else None) as scorer:
            traj = rollout(self.backbone, prompts, group_ids, sample_ids, plan, setup=self.setup,
                           sde_sampler=self.sde_sampler, pre_solver=self.pre_solver,
                           post_solver=self.post_solver, seed=c.seed, iteration=k,
                           batch_size=c.rollout_batch_size, on_images=scorer.submit)
            t1 = time.perf_counter()
            scores = scorer.wait()
        metrics = self.reward_statistics(scores, traj)
        # 4. advantages: per group over every process's samples; this process's rows
        advantages = self.advantages(scores, traj)
        t2 = time.perf_counter()
        # 5. optimize: minibatches of (sample, trained step) pairs, one optimizer step each
        self.backbone.module.train()
        if self._rewards_failed(k, metrics, scorer.errors):  # no signal: nothing to train on (Adam would still move)
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
            m.ITERATION_S: t3 - t0, m.PEAK_MEM_GB: _peak_mem_gb(),
        })
        return metrics

    # == 1. plan =====================================================================================
    def local_batch(self, iteration: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """This process's prompts, global group ids and global sample ids for ``iteration``."""
        c, acc = self.config, self.accelerator
        prompts = self.prompt_set("train", c.prompts_per_iteration, c.seed, iteration=iteration)
        groups = [g for g in range(c.prompts_per_iteration) if g % acc.num_processes == acc.process_index]
        group_ids = torch.tensor([g for g in groups for _ in range(c.group_size)])
        sample_ids = torch.tensor([g * c.group_size + j for g in groups for j in range(c.group_size)])
        return [prompts[g] for g in group_ids.tolist()], group_ids, sample_ids

    def plan(self, iteration: int, sample_ids: torch.Tensor) -> StepPlan:
        """The schedule's plan of ``iteration``; of a per-sample plan, the rows of ``sample_ids``."""
        c = self.config
        plan = self.schedule.plan(iteration, c.num_steps, c.prompts_per_iteration * c.group_size, seed=c.seed)
        if plan.per_sample:
            plan = attrs.evolve(plan, train_steps=tuple(plan.train_steps[int(s)] for s in sample_ids))
        return plan

    def _check_plans(self) -> None:
        """Plan the first and last iterations (plans are pure and cheap): a window that does not fit
        the grid, a trained step that is not an SDE step, a Flash grid that cannot be built, or an
        SDE step the sampler cannot take (CPS into σ = 0, checked at every iteration) is reported now
        rather than after the models have loaded."""
        c = self.config
        for k in sorted({0, c.iterations - 1}):
            plan = self.schedule.plan(k, c.num_steps, c.prompts_per_iteration * c.group_size, seed=c.seed)
            outside = set(plan.all_train_steps()) - set(plan.sde_steps)
            if outside:
                raise ValueError(f"schedule {c.schedule!r} trains steps {sorted(outside)} at iteration {k}, which are "
                                 "not SDE steps: a log-prob exists only on SDE steps")
            self.setup.sigmas(plan)
        if not self.sde_sampler.supports_final_step:
            # every iteration, not only the first and last: a random window may reach the end at any
            # (windowed plans are O(1); a schedule that samples every step is refused at iteration 0)
            for k in range(c.iterations):
                plan = self.schedule.plan(k, c.num_steps, c.prompts_per_iteration * c.group_size, seed=c.seed)
                last = self.setup.sigmas(plan).numel() - 2  # the step into σ = 0 (of a Flash grid too)
                if last in plan.sde_steps and last < plan.num_steps:
                    takes = sorted(n for n, e in self.pm.registry["sampler"].items()
                                   if getattr(e.factory, "stochastic", False)
                                   and getattr(e.factory, "supports_final_step", True))
                    raise ValueError(
                        f"TrainConfig.sde_sampler = {c.sde_sampler!r} ({type(self.sde_sampler).__name__}) cannot "
                        f"take the grid's last step, into σ = 0, as an SDE step (its std is 0 there, so the step "
                        f"has no log-prob), but TrainConfig.schedule = {c.schedule!r} makes step {last}, the last "
                        f"of {last + 1}, an SDE step at iteration {k}. Use an SDE sampler that takes the last "
                        f"step ({', '.join(takes)}), or a windowed schedule ('fixed', 'progressive', 'decay') "
                        f"whose window ends before step {last} at every iteration")

    # == 3. reward and 4. advantages ================================================================
    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows of ``tensor`` (process order), on the CPU."""
        acc = self.accelerator
        return acc.gather(tensor.to(acc.device)).cpu()

    def reward_statistics(self, scores: Mapping[str, torch.Tensor], traj: Trajectories) -> dict[str, float]:
        """``reward/<name>/...`` over every process's samples (``mixgrpo.core.scoring.statistics``)."""
        return scoring.statistics({name: self._gather(s) for name, s in scores.items()},
                                  self._gather(traj.group_ids))

    def advantages(self, scores: Mapping[str, torch.Tensor], traj: Trajectories) -> torch.Tensor:
        """The objective's advantages over every process's samples (groups are compared whole), then
        this process's rows, in the order of ``traj``. A reward that declares ``higher_is_better =
        False`` enters negated: training always raises the advantage."""
        everywhere = {name: self._gather(s) if getattr(self.rewards[name], "higher_is_better", True)
                      else -self._gather(s) for name, s in scores.items()}
        adv = self.objective.advantages(everywhere, self._gather(traj.group_ids))
        return adv[local_rows(self._gather(traj.sample_ids), traj.sample_ids)]

    def _rewards_failed(self, k: int, metrics: dict[str, float], errors: dict[str, BaseException]) -> bool:
        """True when a trained reward scored no sample of iteration ``k`` (on any process). After
        ``max_failed_iterations`` such iterations in a row, or at once when a reward is unavailable
        (``RewardUnavailable`` on any process), ``self._failure`` says why the run must stop."""
        c = self.config
        total = c.prompts_per_iteration * c.group_size
        dead = [name for name in self.rewards if metrics[m.reward(name, "failed")] >= total]
        self._failed_streak = self._failed_streak + 1 if dead else 0
        gone = [name for name, e in errors.items() if isinstance(e, RewardUnavailable)]
        unavailable = not self.all_processes(not gone)  # a collective: every process decides alike
        if dead:
            log.warning("iteration %d: reward(s) %s scored no sample; the iteration trains nothing (%d of %d "
                        "allowed in a row)", k + 1, ", ".join(dead), self._failed_streak, c.max_failed_iterations)
        if unavailable or self._failed_streak >= c.max_failed_iterations:
            name = (gone or dead or list(self.rewards))[0]
            cause = errors.get(name)
            why = ("is unavailable" if unavailable else
                   f"scored no sample in {self._failed_streak} consecutive iterations "
                   f"(TrainConfig.max_failed_iterations = {c.max_failed_iterations})")
            self._failure = RewardFailure(
                f"reward {name!r} {why}; the cause: "
                f"{f'{type(cause).__name__}: {cause}' if cause else 'non-finite scores (or another process)'}")
            self._failure.__cause__ = cause
        return bool(dead) or unavailable

    def _stop_for_reward(self, good: int) -> RewardFailure:
        """Checkpoint the last iteration that trained (``good``; the failed ones after it trained
        nothing, so the weights are its weights) and return the failure, its message saying where
        the run can continue from."""
        failure = self._failure
        assert failure is not None
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

    # == 5. optimize =================================================================================
    def optimize(self, traj: Trajectories, advantages: torch.Tensor, iteration: int) -> dict[str, float]:
        """Optimizer steps over the iteration's samples; returns the policy metrics.

        The samples are split into ``num_minibatches`` minibatches (one optimizer step each). Each step
        averages the loss over its (sample, trained step) pairs. The first minibatch runs before any
        update, so its ratios must be 1: that is the on-policy check (``policy/onpolicy_ratio_dev``).
        A minibatch whose loss or gradient norm is not finite takes no optimizer step (its gradient
        never reaches the weights or the optimizer state) and is counted in ``policy/skipped_steps``.
        """
        c, acc, objective = self.config, self.accelerator, self.objective
        n = len(traj)
        mask = traj.plan.train_mask(n)
        order = torch.randperm(n, generator=keyed_generator(c.seed, iteration, "minibatches"))
        sums: dict[str, float] = defaultdict(float)
        items, evaluations, first_dev, grad_norms, skipped = 0, 0, 0.0, [], 0
        params = self.backbone.trainable_parameters()
        for mb_index, mb in enumerate(order.chunk(c.num_minibatches)):
            chunks = _micro_batches(traj, mb.sort().values, mask, c.micro_batch_size)
            total = sum(len(rows) for _, rows in chunks)
            if total == 0:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss_finite = True
            for j, (step, rows) in enumerate(chunks):
                last = j == len(chunks) - 1  # gradients are reduced across processes on the last one
                with contextlib.nullcontext() if last else self.no_sync():
                    log_prob, kl = self._log_prob(traj, step, rows)
                    old = traj.log_prob[rows, traj.slot(step)].to(log_prob.device)
                    terms, stats = objective.loss(log_prob, old, advantages[rows].to(log_prob.device), kl)
                    loss = terms.sum() / total
                    loss_finite &= bool(torch.isfinite(loss.detach()))
                    acc.backward(loss)
                for key, value in stats.items():
                    sums[key] += float(value.detach().float().sum())
                items += len(rows)
                evaluations += len(_model_rows(traj, step, rows)[0])
                if mb_index == 0:
                    first_dev = max(first_dev, float((stats["ratio"] - 1).abs().max()))
            grad_norm = self.clip_grad_norm(params, c.max_grad_norm)
            if not (math.isfinite(grad_norm) and self.all_processes(loss_finite)):
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                log.warning("iteration %d, minibatch %d: non-finite %s; the optimizer step is skipped",
                            iteration, mb_index, "loss" if not loss_finite else f"gradient norm ({grad_norm})")
                continue
            grad_norms.append(grad_norm)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.step(params)
        if first_dev > self.ratio_tolerance:
            log.warning("on-policy ratio deviates from 1 by %.2e before the first update (tolerance %.0e, a tenth "
                        "of the clip range by default): rollout and training compute different log-probs",
                        first_dev, self.ratio_tolerance)
        calls = self.backbone.calls_per_velocity * (2 if objective.uses_reference else 1)
        mean = {k: v / max(items, 1) for k, v in sums.items()}
        return {
            m.RATIO_MEAN: mean.get("ratio", float("nan")),
            m.CLIPFRAC: mean.get("clipped", float("nan")),
            m.APPROX_KL: mean.get("approx_kl", float("nan")),
            m.ONPOLICY_RATIO_DEV: first_dev,
            m.GRAD_NORM: sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            m.SKIPPED_STEPS: float(skipped),
            m.LOSS_POLICY: mean.get("policy", float("nan")),
            m.LOSS_KL: mean.get("kl", 0.0),
            m.NFE_TRAIN: calls * evaluations / max(n, 1),
        }

    def _log_prob(self, traj: Trajectories, step: int, rows: torch.Tensor) -> tuple[Any, Any]:
        """Log-probs of the stored transitions at ``step`` under the current weights (with grad),
        and the KL to the frozen reference when the objective uses one. At the step whose input a
        group shares (``traj.shared_step``) the model runs once per group: autograd sums the
        gradients of the group's rows through the expansion, as if each row had run it."""
        device = self.backbone.device
        slot = traj.slot(step)
        calls, expand = _model_rows(traj, step, rows)
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
        return res.log_prob, kl

    @property
    def ratio_tolerance(self) -> float:
        """The on-policy ratio deviation that warns: ``TrainConfig.ratio_tolerance``, by default a
        tenth of the objective's clip range (a larger deviation would clip transitions unseen)."""
        c = self.config
        return c.ratio_tolerance if c.ratio_tolerance is not None else self.objective.clip_range / 10

    # == 6. log: held-out evaluation, sample grids, metrics rows ===================================
    def record_evaluation(self, iteration: int, metrics: dict[str, Any]) -> None:
        """Held-out rewards of the model as it is at ``iteration`` (its EMA when the run keeps one)
        into ``metrics``, and every image's score into ``eval_scores.jsonl``."""
        self.backbone.module.eval()
        scores: dict[str, list[float]] = {}
        with self.evaluation_weights():
            metrics.update(self.evaluate(scores))
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / records.EVAL_SCORES, "a") as f:
                f.write(json.dumps({m.ITERATION: iteration, **scores}) + "\n")

    def evaluate(self, scores: dict[str, list[float]] | None = None) -> dict[str, float]:
        """Held-out rewards with deterministic ODE sampling: ``eval/<name>/mean`` and ``/sem``.

        The same prompts and seeds every time; ``scores`` (optional) receives the per-image scores."""
        c = self.config
        prompts = self.prompt_set("eval", c.eval_prompts, c.seed + 1)
        seeds = [c.seed + 1000 * s for s in range(c.eval_seeds)]
        all_prompts = [p for _ in seeds for p in prompts]
        all_seeds = [s for s in seeds for _ in prompts]
        show = c.progress and self.accelerator.is_main_process
        images = sample_ode(self.backbone, all_prompts, all_seeds, setup=self.eval_setup,
                            solver=self.eval_solver, batch_size=c.rollout_batch_size,
                            progress=f"held-out evaluation, {len(all_prompts)} images" if show else None)
        return scoring.evaluate({**self.rewards, **self.eval_only_rewards}, images, all_prompts, scores)

    def draw_grid(self, iteration: int) -> None:
        """The sample grid at fixed prompts and seeds, each image with its scores (written by the main
        process; under FSDP every process takes part in the forward passes, which gather shards)."""
        main = self.accelerator.is_main_process
        if not main and self.parallelism != "fsdp":
            return
        from mixgrpo.core.report import save_sample_grid, scored_captions

        c = self.config
        self.backbone.module.eval()
        prompts = self.prompt_set("eval", c.sample_prompts, c.seed)
        with self.evaluation_weights():
            images = sample_ode(self.backbone, prompts, [c.seed] * len(prompts), setup=self.eval_setup,
                                solver=self.eval_solver, batch_size=c.rollout_batch_size)
        if not main:
            return
        captions = scored_captions({**self.rewards, **self.eval_only_rewards}, images, prompts)
        save_sample_grid(images, captions, self.out / "samples" / f"iter_{iteration:06d}.png",
                         title=f"iteration {iteration}" + (" (base model)" if iteration == 0 else ""))

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """The weights held-out numbers are reported for: the EMA when the run keeps one."""
        if self.ema is None:
            return contextlib.nullcontext()
        return self.ema.applied(self.backbone.trainable_parameters())

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.accelerator.trackers:
            self.accelerator.log({k: float(_jsonable(v)) for k, v in metrics.items()
                                  if k != m.ITERATION and _jsonable(v) is not None}, step=int(metrics[m.ITERATION]))
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / records.METRICS, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")

    # == 7. checkpoint, and the run directory ========================================================
    def _checkpoint(self, iteration: int) -> None:
        path = ckpt.save(self, self.out / "checkpoints", iteration, keep_last=self.config.keep_last)
        if self.accelerator.is_main_process:
            self.pm.on_checkpoint(trainer=self, path=path)

    def _open_run(self, start: str) -> int:
        """Check and prepare the run directory; returns the iteration to start from."""
        acc, root = self.accelerator, self.out / "checkpoints"
        first = 0
        if start not in START_MODES:
            raise ValueError(f"start must be one of {', '.join(START_MODES)}, got {start!r}")
        if start == "resume":
            records.require_run(self.out)  # nothing to continue is a mistake, not a silent fresh start
        if start == "resume" and ckpt.latest(root) is not None:
            changed = records.check_resume(self.out)  # before loading anything: a refused resume changes nothing
            first = ckpt.resume(self, root)
            for group in self.optimizer.param_groups:  # the config's step sizes, recorded if they changed
                group["lr"], group["weight_decay"] = self.config.learning_rate, self.config.weight_decay
            if acc.is_main_process:
                records.truncate_after(self.out, first)
                records.record_resume(self.out, first, changed)
                print(records.describe_resume(self.out, first, changed), flush=True)
        else:
            if start == "resume":  # a run stopped before its first checkpoint: its records are redone
                log.warning("--resume: no checkpoint in %s; starting from iteration 0", root)
            elif start == "new":
                records.refuse_existing_run(self.out)  # on every process alike
            acc.wait_for_everyone()
            if acc.is_main_process:
                records.prepare_new(self.out)
        if acc.is_main_process:
            (self.out / "config.gin").write_text(gin.operative_config_str() or gin.config_str())
            if self.launch is not None:
                records.write_launch(self.out, self.launch)
        acc.wait_for_everyone()
        return first

    def _start_trackers(self) -> None:
        """TensorBoard in ``output_dir/tensorboard``; on resume it purges its events from the first
        iteration this run will log again, so no step is recorded twice."""
        if self._tensorboard:
            kwargs = {"purge_step": self.start_iteration + 1} if self.start_iteration else {}
            self.accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": kwargs})

    def close(self) -> None:
        """End of the process's work: every rank reaches here, then the process group is torn down
        (a gloo/NCCL group left to the interpreter's exit can abort a rank with ``terminate called
        without an active exception``)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.state.destroy_process_group()  # trackers were finished by train()

    # == the parallel layout =========================================================================
    def _shard_backbone(self) -> None:
        if getattr(self.backbone, "lora_rank", 0) > 0:
            raise ValueError("FSDP is for full fine-tuning; LoRA runs train with DDP (the adapters are small): "
                             "launch with experiments/accelerate/ddp.yaml or set TrainConfig.parallelism = 'ddp'")
        module = self.backbone.module
        compute = getattr(self.backbone, "dtype", torch.float32)
        self.backbone.module = shard(module, compute, self.backbone.device)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Accumulate gradients locally (DDP); FSDP reduce-scatters every micro-batch, which keeps
        the gradients sharded."""
        if self.parallelism == "fsdp":
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.backbone.module)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        if self.parallelism == "fsdp":
            return clip_grad_norm(params, max_norm)
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def all_processes(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process (so all take the same decision)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        failed = acc.reduce(torch.tensor([0.0 if flag else 1.0], device=acc.device), reduction="sum")
        return float(failed) == 0.0


def _reward_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="mixgrpo-reward")


class _ChunkScorer:
    """Scores each rollout chunk's images as the rollout hands them over: at once, or in ``pool``'s
    background thread (``TrainConfig.overlap_rewards``). The reward calls and their images are the
    same either way, so are the scores. ``inline_s`` is the scoring time spent inside the rollout."""

    def __init__(self, rewards: Mapping[str, Reward], prompts: Sequence[str],
                 pool: ThreadPoolExecutor | None) -> None:
        self.rewards, self.prompts = rewards, list(prompts)
        self.scores = {name: torch.full((len(prompts),), float("nan")) for name in rewards}
        self.errors: dict[str, BaseException] = {}
        self.inline_s = 0.0
        self._pool = pool
        self._pending: list[Future] = []

    def __enter__(self) -> _ChunkScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, images: torch.Tensor, rows: slice) -> None:
        if self._pool is not None:
            self._pending.append(self._pool.submit(self._score, images, rows))
        else:
            t = time.perf_counter()
            self._score(images, rows)
            self.inline_s += time.perf_counter() - t

    def _score(self, images: torch.Tensor, rows: slice) -> None:
        for name, s in scoring.score(self.rewards, images, self.prompts[rows], self.errors).items():
            self.scores[name][rows] = s

    def wait(self) -> dict[str, torch.Tensor]:
        """Every sample's scores, once every chunk is scored (a failure other than the reward's own,
        which ``scoring`` masks, is raised here)."""
        for future in self._pending:
            future.result()
        return self.scores


def _make_accelerator(config: TrainConfig, out: Path) -> Accelerator:
    """One process on CPU or GPU by default (``accelerate launch`` for more), with TensorBoard
    tracking in ``out/tensorboard`` when asked for and installed."""
    from accelerate.tracking import is_tensorboard_available

    tensorboard = config.tensorboard and is_tensorboard_available()
    return Accelerator(cpu=not torch.cuda.is_available(), log_with="tensorboard" if tensorboard else None,
                       project_dir=str(out))


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[str]]:
    """Yields a list that receives the name of a SIGTERM or first SIGINT (Ctrl-C) while inside; the
    loop then stops after its current iteration. A second Ctrl-C interrupts at once. Outside the
    main thread (where handlers cannot be installed) nothing is caught."""
    import signal
    import threading

    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handle(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if caught and signum == signal.SIGINT:
            raise KeyboardInterrupt
        caught.append(name)
        print(f"\n{name}: stopping after this iteration with a checkpoint (Ctrl-C again to abort)", flush=True)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_batch_layout(c: TrainConfig, world: int) -> None:
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


def _model_rows(traj: Trajectories, step: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The samples the model runs on at ``step`` for the samples ``rows``, and the index that expands
    its output back to ``rows`` (``None``: one model row per sample). At the step a group shares, one
    sample per group."""
    if step != traj.shared_step:
        return rows, None
    _, first, expand = first_of_each(traj.group_ids[rows])
    return rows[first], expand


def _micro_batches(traj: Trajectories, rows: torch.Tensor, mask: torch.Tensor,
                   size: int) -> list[tuple[int, torch.Tensor]]:
    """``(step, sample rows)`` pairs: for each trained step, its samples in chunks of ``size``; at the
    step a group shares (one model call per group), chunks of ``size`` groups."""
    chunks = []
    for step in traj.plan.all_train_steps():
        members = rows[mask[rows, step]]
        if step != traj.shared_step:
            chunks += [(step, part) for part in members.split(size)]
            continue
        groups, _, which = first_of_each(traj.group_ids[members])
        for part in torch.arange(len(groups)).split(size):
            chunks.append((step, members[torch.isin(which, part)]))
    return chunks


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _peak_mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:  # pragma: no cover
        warnings.warn("peak memory unavailable on this platform", stacklevel=2)
        return float("nan")
