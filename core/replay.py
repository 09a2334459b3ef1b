"""Off-policy replay (OP-GRPO, Zhang et al., arXiv 2604.04142): past trajectories reused in later groups.

The trainer keeps a ``ReplayBuffer`` when its objective declares a ``ReplaySpec``
(``PolicyObjective.replay``), at most one entry per prompt. Per iteration:

1. ``arrange``: a group whose prompt has a live entry gives its last sample's slot to it (that row is
   moved after the fresh rows).
2. ``rollout``: the fresh rows roll out as usual. Each replayed row reuses its entry's stored steps
   0 … τ−1, drawn by the policy π_b of the iteration that stored it, and the current policy walks on
   from the stored x_τ with the plan's samplers and the row's own noise, down to an image that is
   scored as any other. The reused steps' log-probs under this iteration's weights (π_old) are
   computed once, without grad: training clips π_θ/π_old at every step, as for the fresh samples,
   and the sample's advantages are multiplied by the detached sequence-level importance weight
   ``w = Π_{i<τ} π_old(x_{i+1} | x_i) / π_b(x_{i+1} | x_i)`` (or its τ-th root; capped at
   ``max_weight``). The steps from τ on are drawn by the current policy: their factor is 1.
3. ``admit``: after the rewards, each group's best fresh sample (the objective's reward weights; a
   reward where lower is better enters negated) is stored under its prompt when the prompt has no
   entry, when it scores at least the entry's reward, or when the entry is too old to be replayed.

Every process holds the whole buffer (each iteration's new entries are gathered), so any process can
replay any prompt, and the buffer is part of the checkpoint: a resumed run replays what the run would
have. docs/algorithms.md, "OP-GRPO", gives the math and which of these choices are the paper's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import torch

from mixgrpo.core import metrics as m
from mixgrpo.core import scoring
from mixgrpo.core.rollout import _ChunkStart, _rollout_chunk, _solver_per_step, encode_unique
from mixgrpo.core.types import Conditioning, EditPrompt, ReplaySpec, StepPlan, Trajectories

if TYPE_CHECKING:
    from mixgrpo.core.trainer import Trainer

log = logging.getLogger(__name__)
TENSORS, INDEX = "replay.safetensors", "replay.json"


@attrs.define
class Entry:
    """One stored trajectory prefix: ``states`` ``[τ+1, *latent]`` x_0 … x_τ (fp32, CPU), ``log_prob``
    ``[τ]`` the log-probs π_b gave its τ transitions, the sample's ``reward`` and the 0-based
    ``iteration`` that drew it."""

    states: torch.Tensor
    log_prob: torch.Tensor
    reward: float
    iteration: int


@attrs.frozen
class _Replayed:
    """The replayed rows' stored transitions, log-probs (π_old before τ), final latents, images and weights."""

    x: torch.Tensor
    x_next: torch.Tensor
    log_prob: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor
    weight: torch.Tensor


class ReplayBuffer:
    """The buffer of an objective's ``ReplaySpec``; ``owner`` names the objective's class in messages
    (``OPGRPO.capacity``)."""

    def __init__(self, spec: ReplaySpec, owner: str = "the objective") -> None:
        self.spec, self.owner = spec, owner
        self.entries: dict[str, Entry] = {}  # insertion order: the entry stored longest ago first
        self.replayed = 0  # rows the last rollout replayed
        self.weights = torch.zeros(0)  # and their importance weights

    def __len__(self) -> int:
        return len(self.entries)

    def live(self, prompt: str, iteration: int) -> Entry | None:
        """The entry of ``prompt`` if it may be replayed at ``iteration`` (0-based), else None."""
        entry = self.entries.get(prompt)
        return entry if entry is not None and iteration - entry.iteration <= self.spec.max_age else None

    # == 1. which rows replay ========================================================================
    def arrange(self, prompts: Sequence[str], group_ids: torch.Tensor, sample_ids: torch.Tensor,
                iteration: int) -> tuple[list[str], torch.Tensor, torch.Tensor, int]:
        """The rows reordered with the replayed ones (the last row of each group whose prompt has a live
        entry) after the fresh ones, and the number of replayed rows."""
        last = {int(g): n for n, g in enumerate(group_ids.tolist())}
        replayed = [n for n in last.values() if self.live(prompts[n], iteration) is not None]
        chosen = set(replayed)
        order = [n for n in range(len(prompts)) if n not in chosen] + replayed
        index = torch.tensor(order, dtype=torch.long)
        return [prompts[n] for n in order], group_ids[index], sample_ids[index], len(replayed)

    # == 2. the rollout ==============================================================================
    def rollout(self, trainer: Trainer, prompts: Sequence[str], group_ids: torch.Tensor, sample_ids: torch.Tensor,
                plan: StepPlan, replayed: int, iteration: int,
                on_images: Callable[[torch.Tensor, slice], None] | None = None) -> Trajectories:
        """The fresh rows (all but the last ``replayed``) through ``trainer.rollout_rows``, then the
        replayed ones from their entries' x_τ (module docstring); ``Trajectories.weight`` holds every
        row's importance weight (1 for the fresh rows)."""
        n = len(prompts)
        fresh_rows = n - replayed
        fresh = trainer.rollout_rows(prompts[:fresh_rows], group_ids[:fresh_rows], sample_ids[:fresh_rows],
                                     _rows_of(plan, slice(0, fresh_rows)), iteration, on_images)
        self.replayed, self.weights = replayed, torch.zeros(0)
        if not replayed:
            return attrs.evolve(fresh, weight=torch.ones(n))
        rows = slice(fresh_rows, n)
        entries = [self.live(p, iteration) for p in prompts[rows]]
        if any(e is None for e in entries):
            raise RuntimeError("a replayed row's entry left the buffer between arrange() and rollout()")
        cond = encode_unique(trainer.backbone, prompts)  # every row's: the replayed rows' and the result's
        part = self._walk(trainer, cond.select(torch.arange(fresh_rows, n)), sample_ids[rows], entries,
                          _rows_of(plan, rows), iteration,
                          None if on_images is None else lambda images, r: on_images(images, _shift(r, fresh_rows)))
        self.weights = part.weight
        calls = (fresh.sigmas.numel() - 1) * trainer.backbone.calls_per_velocity  # the walk from τ, π_old's τ
        return Trajectories(
            prompts=list(prompts), group_ids=group_ids, sample_ids=sample_ids, sigmas=fresh.sigmas, plan=plan,
            sde_steps=fresh.sde_steps, x=torch.cat([fresh.x, part.x]), x_next=torch.cat([fresh.x_next, part.x_next]),
            log_prob=torch.cat([fresh.log_prob, part.log_prob]), latents=torch.cat([fresh.latents, part.latents]),
            images=torch.cat([fresh.images, part.images]), cond=cond,
            nfe=(fresh.nfe * fresh_rows + calls * replayed) / n, seed=fresh.seed,
            weight=torch.cat([torch.ones(fresh_rows), part.weight]))

    @torch.no_grad()
    def _walk(self, trainer: Trainer, cond: Conditioning, sample_ids: torch.Tensor, entries: list[Entry],
              plan: StepPlan, iteration: int, on_images: Callable[[torch.Tensor, slice], None] | None) -> _Replayed:
        """The replayed rows (``cond``: their conditioning): stored steps 0 … τ−1, the current policy's walk
        from x_τ, π_old and w."""
        backbone, c, tau = trainer.backbone, trainer.config, self.spec.truncate_step
        sigmas = trainer.setup.sigmas(plan)
        steps = tuple(sorted(set(plan.sde_steps)))
        solvers = _solver_per_step(sigmas.numel() - 1, plan, steps, trainer.pre_solver, trainer.post_solver)
        states = torch.stack([e.states for e in entries])  # [R, τ+1, *latent]
        behaviour = torch.stack([e.log_prob for e in entries])  # [R, τ]
        old = torch.empty_like(behaviour)
        xs, x_nexts, log_probs, latents, images = [], [], [], [], []
        size, device = c.rollout_batch_size, backbone.device
        for start in range(0, len(entries), size):
            rows = slice(start, min(start + size, len(entries)))
            chunk_cond = cond.select(torch.arange(len(entries))[rows])
            begin = _ChunkStart(x=states[rows, tau], step=tau)  # the stored x_τ
            walked = _rollout_chunk(backbone, begin, chunk_cond, sample_ids[rows], sigmas, solvers, trainer.sde_sampler,
                                    c.seed, iteration)
            for i in range(tau):  # π_old of the reused transitions, as training recomputes them
                x = states[rows, i].to(device)
                v = backbone.velocity(x, torch.full((x.shape[0],), float(sigmas[i]), device=device), chunk_cond)
                res = trainer.sde_sampler.step(x, v.float(), sigmas, i, prev_sample=states[rows, i + 1].to(device))
                old[rows, i] = res.log_prob.float().cpu()
            decoded = backbone.decode(walked.latents).float()
            if on_images is not None:
                on_images(decoded, rows)
            xs.append(torch.cat([states[rows, :tau], walked.x], 1))
            x_nexts.append(torch.cat([states[rows, 1:], walked.x_next], 1))
            log_probs.append(torch.cat([old[rows], walked.log_prob], 1))
            latents.append(walked.latents)
            images.append(decoded)
        return _Replayed(torch.cat(xs), torch.cat(x_nexts), torch.cat(log_probs), torch.cat(latents),
                         torch.cat(images), self.weight(old, behaviour))

    def weight(self, old: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
        """``[R]`` the sequence-level importance weights from π_old's and π_b's log-probs ``[R, τ]``."""
        log_ratio = (old - behaviour).double()
        log_w = log_ratio.sum(1) if self.spec.weight == "product" else log_ratio.mean(1)
        w = torch.exp(log_w)
        return (w if self.spec.max_weight is None else w.clamp(max=self.spec.max_weight)).float()

    def metrics(self, num_samples: int) -> dict[str, float]:
        nan, w = float("nan"), self.weights
        return {m.REPLAY_FRACTION: self.replayed / max(num_samples, 1),
                m.REPLAY_WEIGHT_MEAN: float(w.mean()) if len(w) else nan,
                m.REPLAY_WEIGHT_MAX: float(w.max()) if len(w) else nan, m.REPLAY_BUFFER: float(len(self))}

    # == 3. what enters the buffer ===================================================================
    def admit(self, trainer: Trainer, traj: Trajectories, scores: dict[str, torch.Tensor], iteration: int) -> None:
        """Store each group's best fresh sample of ``iteration`` (0-based), gathered from every process."""
        tau, weights = self.spec.truncate_step, trainer.objective.weights or dict.fromkeys(scores, 1.0)
        value = sum(float(weights.get(name, 1.0)) * s for name, s in scoring.oriented(trainer.rewards, scores).items())
        fresh = len(traj) - self.replayed
        groups = list(dict.fromkeys(traj.group_ids.tolist()))
        shape = traj.x.shape[2:]
        states, log_prob = torch.zeros(len(groups), tau + 1, *shape), torch.zeros(len(groups), tau)
        reward = torch.full((len(groups),), float("nan"))
        for k, g in enumerate(groups):
            rows = [n for n in range(fresh) if int(traj.group_ids[n]) == g and torch.isfinite(value[n])]
            if not rows:  # no fresh sample of the group was scored
                continue
            best = max(rows, key=lambda n: float(value[n]))
            states[k, :tau], states[k, tau] = traj.x[best, :tau], traj.x_next[best, tau - 1]
            log_prob[k], reward[k] = traj.log_prob[best, :tau], value[best]
        gather = trainer.parallel.gather
        everywhere = self._prompts(trainer, iteration)
        for g, s, lp, r in zip(gather(torch.tensor(groups)).tolist(), gather(states), gather(log_prob),
                               gather(reward).tolist(), strict=True):
            if r == r:  # not NaN
                self._offer(everywhere[g], Entry(s.clone(), lp.clone(), r, iteration))
        for prompt in [p for p, e in self.entries.items() if iteration + 1 - e.iteration > self.spec.max_age]:
            del self.entries[prompt]  # too old to be replayed next iteration
        while len(self.entries) > self.spec.capacity:
            del self.entries[next(iter(self.entries))]

    def _offer(self, prompt: str, entry: Entry) -> None:
        held = self.entries.get(prompt)
        if held is None or entry.reward >= held.reward or self.live(prompt, entry.iteration) is None:
            self.entries.pop(prompt, None)
            self.entries[prompt] = entry

    @staticmethod
    def _prompts(trainer: Trainer, iteration: int) -> list[str]:
        """Every group's prompt of ``iteration`` by global group id (what ``Trainer.local_batch`` splits)."""
        c = trainer.config
        return trainer.prompt_set("train", c.prompts_per_iteration, c.seed, iteration=iteration)

    # == memory and checkpoints ======================================================================
    def check_memory(self, latent_shape: Sequence[int], processes: int = 1) -> None:
        """Refuse a capacity whose full buffer (every process on this machine holds one) would take more
        than half of the memory available now."""
        numel = int(torch.Size(latent_shape).numel())
        per_entry = 4 * ((self.spec.truncate_step + 1) * numel + self.spec.truncate_step)
        need, available = self.spec.capacity * per_entry * processes, available_memory()
        if available is None or need <= available / 2:
            return
        fits = max(int(available / 2 // (per_entry * processes)), 0)
        raise ValueError(
            f"{self.owner}.capacity = {self.spec.capacity} stored trajectories of {per_entry / 2**20:.2f} MiB each "
            f"(τ + 1 = {self.spec.truncate_step + 1} latents of shape {tuple(latent_shape)}, fp32) x {processes} "
            f"process(es) on this machine need {need / 2**30:.2f} GiB, more than half of the "
            f"{available / 2**30:.2f} GiB of memory available: set {self.owner}.capacity to at most {fits}, or a "
            f"smaller {self.owner}.truncate_step")

    def save(self, directory: Path) -> None:
        """Write the buffer into a checkpoint folder (``replay.safetensors`` and ``replay.json``)."""
        from mixgrpo.core.checkpoint import _write_tensors

        items = list(self.entries.items())
        tensors = {}
        for k, (_, entry) in enumerate(items):
            tensors[f"{k}.states"], tensors[f"{k}.log_prob"] = entry.states.contiguous(), entry.log_prob.contiguous()
        if tensors:
            _write_tensors(tensors, directory / TENSORS)
        index = [{"prompt": str(p), "image": p.image if isinstance(p, EditPrompt) else None, "reward": e.reward,
                  "iteration": e.iteration} for p, e in items]
        (directory / INDEX).write_text(json.dumps({"entries": index}))

    def load(self, directory: Path) -> None:
        """Read what ``save`` wrote (an empty buffer, with a warning, from a checkpoint without one)."""
        from safetensors.torch import load_file

        self.entries = {}
        if not (directory / INDEX).is_file():
            log.warning("checkpoint %s holds no replay buffer: the run continues with an empty one", directory)
            return
        index = json.loads((directory / INDEX).read_text())["entries"]
        tensors = load_file(str(directory / TENSORS)) if index else {}
        for k, item in enumerate(index):
            prompt = item["prompt"] if item["image"] is None else EditPrompt(item["prompt"], item["image"])
            self.entries[prompt] = Entry(tensors[f"{k}.states"], tensors[f"{k}.log_prob"], float(item["reward"]),
                                         int(item["iteration"]))


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _rows_of(plan: StepPlan, rows: slice) -> StepPlan:
    """``plan`` for the samples ``rows`` of the iteration (a per-sample plan's rows)."""
    return attrs.evolve(plan, train_steps=plan.train_steps[rows]) if plan.per_sample else plan


def _shift(rows: slice, offset: int) -> slice:
    return slice(rows.start + offset, rows.stop + offset)
