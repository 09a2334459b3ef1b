"""The trainer: plan → rollout → reward → advantages → train the planned steps → log → checkpoint.

One loop for every method: what differs between FlowGRPO, DanceGRPO and MixGRPO lives in the
plugins a gin recipe selects, never in branches here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import gin
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from mixgrpo.core import base_eval, records
from mixgrpo.core import checkpoint as ckpt
from mixgrpo.core.config import TrainConfig
from mixgrpo.core.ema import EMA
from mixgrpo.core.parallel import clip_grad_norm, resolve_parallelism, shard
from mixgrpo.core.plugins import PluginManager, get_plugin_manager, make_sampler
from mixgrpo.core.report import format_value
from mixgrpo.core.rollout import SamplingSetup, rollout, sample_ode
from mixgrpo.core.training import RewardFailure, evaluate_rewards, score_rewards, train_on_trajectories
from mixgrpo.core.types import Trajectories

log = logging.getLogger(__name__)
POLICY_METRICS = ("policy/ratio_mean", "policy/clipfrac", "policy/approx_kl", "policy/onpolicy_ratio_dev",
                  "policy/grad_norm", "loss/policy", "loss/kl")


class Trainer:
    """Runs one experiment described by ``TrainConfig`` (gin) in ``config.output_dir``."""

    def __init__(self, config: TrainConfig, pm: PluginManager | None = None,
                 accelerator: Accelerator | None = None) -> None:
        self.config = config
        self.pm = pm or get_plugin_manager()
        config.validate(self.pm)
        self.out = Path(config.output_dir)
        self.accelerator = accelerator or _make_accelerator(config, self.out)
        self._tensorboard = bool(self.accelerator.log_with)
        self.base_cache: Path | None = None  # a folder of shared base evaluations (mixgrpo compare sets it)
        c = config
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
        self.setup = SamplingSetup(num_steps=c.num_steps, shift=c.shift, grid=c.grid,
                                   compression=c.compression, shared_noise=c.shared_noise)
        # evaluation and sample grids: the ODE on their own grid (FlowGRPO evaluates SD3.5 at 40 steps)
        self.eval_setup = attrs.evolve(self.setup, num_steps=c.eval_num_steps or c.num_steps, compression=None)
        _check_batch_layout(c, self.accelerator.num_processes)
        self._check_plans()
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
        self._failed_streak = 0  # consecutive iterations in which a trained reward scored nothing
        self._failure: RewardFailure | None = None

    def _check_plans(self) -> None:
        """Plan the first and last iterations (plans are pure and cheap): a window that does not fit
        the grid, a trained step that is not an SDE step, or a Flash grid that cannot be built is
        reported now rather than after the models have loaded."""
        c = self.config
        for k in sorted({0, c.iterations - 1}):
            plan = self.schedule.plan(k, c.num_steps, c.prompts_per_iteration * c.group_size, seed=c.seed)
            outside = set(plan.all_train_steps()) - set(plan.sde_steps)
            if outside:
                raise ValueError(f"schedule {c.schedule!r} trains steps {sorted(outside)} at iteration {k}, which are "
                                 "not SDE steps: a log-prob exists only on SDE steps")
            self.setup.sigmas(plan)

    def _shard_backbone(self) -> None:
        if getattr(self.backbone, "lora_rank", 0) > 0:
            raise ValueError("FSDP is for full fine-tuning; LoRA runs train with DDP (the adapters are small): "
                             "launch with experiments/accelerate/ddp.yaml or set TrainConfig.parallelism = 'ddp'")
        module = self.backbone.module
        compute = getattr(self.backbone, "dtype", torch.float32)
        self.backbone.module = shard(module, compute, self.backbone.device)

    # -- what the optimisation loop needs from the parallel layout ------------------------------
    @property
    def ratio_tolerance(self) -> float:
        """The on-policy ratio deviation that warns: ``TrainConfig.ratio_tolerance``, by default a
        tenth of the objective's clip range (a larger deviation would clip transitions unseen)."""
        c = self.config
        return c.ratio_tolerance if c.ratio_tolerance is not None else self.objective.clip_range / 10

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

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.backbone.trainable_parameters())

    # -- one iteration -------------------------------------------------------------------------
    def local_batch(self, iteration: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """This process's prompts, global group ids and global sample ids for ``iteration``."""
        c, acc = self.config, self.accelerator
        prompts = self.prompt_set("train", c.prompts_per_iteration, c.seed, iteration=iteration)
        groups = [g for g in range(c.prompts_per_iteration) if g % acc.num_processes == acc.process_index]
        group_ids = torch.tensor([g for g in groups for _ in range(c.group_size)])
        sample_ids = torch.tensor([g * c.group_size + j for g in groups for j in range(c.group_size)])
        return [prompts[g] for g in group_ids.tolist()], group_ids, sample_ids

    def iteration(self, k: int) -> dict[str, float]:
        c = self.config
        t0 = time.perf_counter()
        prompts, group_ids, sample_ids = self.local_batch(k)
        plan = self.schedule.plan(k, c.num_steps, c.prompts_per_iteration * c.group_size, seed=c.seed)
        if plan.per_sample:  # keep this process's rows of a per-sample plan
            plan = _select_plan_rows(plan, sample_ids)
        self.backbone.module.eval()
        traj = rollout(self.backbone, prompts, group_ids, sample_ids, plan, setup=self.setup,
                       sde_sampler=self.sde_sampler, pre_solver=self.pre_solver, post_solver=self.post_solver,
                       seed=c.seed, iteration=k, batch_size=c.rollout_batch_size)
        t1 = time.perf_counter()
        errors: dict[str, BaseException] = {}
        rewards, metrics = score_rewards(self.rewards, traj.images, prompts, traj.group_ids, self.accelerator,
                                         errors)
        advantages = self._advantages(rewards, traj)
        t2 = time.perf_counter()
        self.backbone.module.train()
        if self._rewards_failed(k, metrics, errors):  # no signal: nothing to train on (Adam would still move)
            train_metrics = {**dict.fromkeys(POLICY_METRICS, float("nan")), "perf/nfe_train": 0.0,
                             "policy/skipped_steps": float(c.num_minibatches)}
        else:
            train_metrics = train_on_trajectories(self, traj, advantages, k)
        t3 = time.perf_counter()
        metrics.update(train_metrics)
        window = plan.window or (-1, 0)
        metrics.update({
            "window/start": float(window[0]), "window/size": float(window[1]),
            "perf/nfe_rollout": float(traj.nfe),
            "perf/rollout_s": t1 - t0, "perf/reward_s": t2 - t1, "perf/train_s": t3 - t2,
            "perf/iteration_s": t3 - t0, "perf/peak_mem_gb": _peak_mem_gb(),
        })
        return metrics

    def _rewards_failed(self, k: int, metrics: dict[str, float], errors: dict[str, BaseException]) -> bool:
        """True when a trained reward scored no sample of iteration ``k`` (on any process); after
        ``max_failed_iterations`` such iterations in a row the run stops with the reward's error."""
        c = self.config
        total = c.prompts_per_iteration * c.group_size
        dead = [name for name in self.rewards if metrics[f"reward/{name}/failed"] >= total]
        self._failed_streak = self._failed_streak + 1 if dead else 0
        if dead:
            log.warning("iteration %d: reward(s) %s scored no sample; the iteration trains nothing (%d of %d "
                        "allowed in a row)", k + 1, ", ".join(dead), self._failed_streak, c.max_failed_iterations)
        if self._failed_streak >= c.max_failed_iterations:
            name = dead[0]
            cause = errors.get(name)
            self._failure = RewardFailure(
                f"reward {name!r} scored no sample in {self._failed_streak} consecutive iterations "
                f"(TrainConfig.max_failed_iterations = {c.max_failed_iterations}); last error: "
                f"{type(cause).__name__ if cause else 'non-finite scores'}: {cause}")
            self._failure.__cause__ = cause
        return bool(dead)

    def _advantages(self, rewards: dict[str, torch.Tensor], traj: Trajectories) -> torch.Tensor:
        """Advantages over all processes' samples (gathered), then this process's rows."""
        acc = self.accelerator
        all_rewards = {k: acc.gather(v.to(acc.device)).cpu() for k, v in rewards.items()}
        all_groups = acc.gather(traj.group_ids.to(acc.device)).cpu()
        all_samples = acc.gather(traj.sample_ids.to(acc.device)).cpu()
        adv = self.objective.advantages(all_rewards, all_groups)
        where = {int(s): n for n, s in enumerate(all_samples)}
        return adv[[where[int(s)] for s in traj.sample_ids]]

    # -- the loop ------------------------------------------------------------------------------
    def train(self, resume: bool = False, overwrite: bool = False) -> list[dict[str, float]]:
        """Run iterations ``start_iteration .. iterations - 1``; returns their metrics rows.

        ``resume`` continues the run in ``output_dir`` from its latest checkpoint (refusing a config
        that changes the experiment, see ``mixgrpo.core.records``); without it a directory that
        holds a run is refused unless ``overwrite``. SIGTERM or a first Ctrl-C stops the run at the
        end of the current iteration with a checkpoint; ``stopped`` then tells why.
        """
        with records.storage_errors(self.out):
            return self._train(resume, overwrite)

    def _train(self, resume: bool, overwrite: bool) -> list[dict[str, float]]:
        c, acc = self.config, self.accelerator
        self.start_iteration, self.stopped = self._open_run(resume, overwrite), None
        self._start_trackers()
        history: list[dict[str, float]] = []
        if self.start_iteration == 0 and (c.eval_every or c.sample_every):
            history_row: dict[str, Any] = {"iteration": 0}
            base_eval.evaluate_base(self, history_row, self.base_cache)  # shared with identical runs
            self._log(history_row)
        bar = tqdm(range(self.start_iteration, c.iterations), desc=f"{c.objective}", unit="it",
                   disable=not (c.progress and acc.is_main_process), initial=self.start_iteration,
                   total=c.iterations)
        with _stop_on_signals() as stop:
            for k in bar:
                metrics = {"iteration": k + 1, **self.iteration(k)}
                last = k + 1 == c.iterations  # the final model is always evaluated and drawn
                due_eval = bool(c.eval_every) and ((k + 1) % c.eval_every == 0 or last)
                due_sample = bool(c.sample_every) and ((k + 1) % c.sample_every == 0 or last)
                if due_eval:
                    self.record_evaluation(k + 1, metrics)
                if due_sample:
                    self.draw_grid(k + 1)
                self._log(metrics)
                history.append(metrics)
                if self._failure is not None:  # recorded first, then the run stops with the reward's error
                    raise self._failure
                self.pm.on_iteration_end(trainer=self, iteration=k + 1, metrics=metrics)
                first = next(iter(c.rewards))
                bar.set_postfix(reward=format_value(metrics[f"reward/{first}/mean"]),
                                s_it=f"{metrics['perf/iteration_s']:.2f}")
                halt = not self.all_processes(not stop)
                if halt or (c.checkpoint_every and ((k + 1) % c.checkpoint_every == 0 or last)):
                    self._checkpoint(k + 1)
                if halt:
                    self.stopped = f"stopped by {stop[0]} after iteration {k + 1} (checkpoint saved)"
                    break
        for tracker in self.accelerator.trackers:
            tracker.finish()  # flush and close the TensorBoard writer
        if acc.is_main_process and not self.stopped:
            from mixgrpo.core.model_card import write_model_card

            # README.md: what was trained and how it scores, to publish as is
            write_model_card(self.out, c, self.backbone, self.prompt_set("eval", 1, c.seed)[0])
        return history

    def _open_run(self, resume: bool, overwrite: bool) -> int:
        """Check and prepare the run directory; returns the iteration to start from."""
        acc, root = self.accelerator, self.out / "checkpoints"
        start = 0
        if resume and ckpt.latest(root) is not None:
            changed = records.check_resume(self.out)  # before loading anything: a refused resume changes nothing
            start = ckpt.resume(self, root)
            for group in self.optimizer.param_groups:  # the config's step sizes, recorded if they changed
                group["lr"], group["weight_decay"] = self.config.learning_rate, self.config.weight_decay
            if acc.is_main_process:
                records.truncate_after(self.out, start)
                records.record_resume(self.out, start, changed)
        else:
            if resume:  # nothing to continue: whatever records exist belong to iterations to run again
                log.warning("--resume: no checkpoint in %s; starting from iteration 0", root)
            elif not overwrite:
                records.refuse_existing_run(self.out)  # on every process alike
            acc.wait_for_everyone()
            if acc.is_main_process:
                records.prepare_new(self.out)
        if acc.is_main_process:
            (self.out / "config.gin").write_text(gin.operative_config_str() or gin.config_str())
        acc.wait_for_everyone()
        return start

    def _start_trackers(self) -> None:
        """TensorBoard in ``output_dir/tensorboard``; on resume it purges its events from the first
        iteration this run will log again, so no step is recorded twice."""
        if self._tensorboard:
            kwargs = {"purge_step": self.start_iteration + 1} if self.start_iteration else {}
            self.accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": kwargs})

    def _checkpoint(self, iteration: int) -> None:
        path = ckpt.save(self, self.out / "checkpoints", iteration, keep_last=self.config.keep_last)
        if self.accelerator.is_main_process:
            self.pm.on_checkpoint(trainer=self, path=path)

    def close(self) -> None:
        """End of the process's work: every rank reaches here, then the process group is torn down
        (a gloo/NCCL group left to the interpreter's exit can abort a rank with ``terminate called
        without an active exception``)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.state.destroy_process_group()  # trackers were finished by train()

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
                f.write(json.dumps({"iteration": iteration, **scores}) + "\n")

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
        return evaluate_rewards({**self.rewards, **self.eval_only_rewards}, images, all_prompts, scores)

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.accelerator.trackers:
            self.accelerator.log({k: float(_jsonable(v)) for k, v in metrics.items()
                                  if k != "iteration" and _jsonable(v) is not None}, step=int(metrics["iteration"]))
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / records.METRICS, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")


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
        raise ValueError(f"prompts_per_iteration={c.prompts_per_iteration} must be divisible by the "
                         f"number of processes ({world}) so that every process holds whole groups")
    local = c.prompts_per_iteration // world * c.group_size
    if local % c.num_minibatches:
        raise ValueError(f"num_minibatches={c.num_minibatches} must divide the {local} samples each process holds "
                         f"per iteration ({c.prompts_per_iteration} prompts x group_size {c.group_size} over "
                         f"{world} process(es)), so that every optimizer step averages the same number of samples")


def _select_plan_rows(plan: Any, sample_ids: torch.Tensor) -> Any:
    rows = tuple(plan.train_steps[int(s)] for s in sample_ids)
    return attrs.evolve(plan, train_steps=rows)


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
