"""How off-policy each denoising step's ratio gets: why OP-GRPO reuses only the early steps.

    .venv/bin/python benchmarks/offpolicy_ratios.py runs/compare_offpolicy/FlowGRPO/seed_0
    .venv/bin/python benchmarks/offpolicy_ratios.py RUN_DIR --checkpoint 20 --prompts 32 --json out.json

Takes a finished run (its config and a checkpoint, by default the latest). The base model (the
behaviour policy π_b of a buffer entry stored before any training) rolls out ``--prompts`` prompts
× ``--group`` samples with the run's own plan, SDE sampler and grid, and every SDE transition's
log-prob is kept. The checkpoint's weights (the policy π that would replay them) then recompute the
log-probs of the same transitions. Per step i it prints σ_i, the step's std s_i, the mean and
largest |log π − log π_b| over the samples, and, for a truncation at τ = i + 1, the spread (std over
the samples) of the sequence-level log-weight Σ_{j ≤ i} (log π − log π_b): the larger it is, the
more a few replayed samples dominate a batch. Nothing is trained; no file of the run is written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def measure(run_dir: Path, checkpoint: str | None = None, prompts: int = 16, group: int = 4,
            seed: int = 1234) -> dict:
    """The per-step table of ``run_dir`` (module docstring) as a dict of lists, one entry per SDE step."""
    from mixgrpo.core import checkpoint as ckpt
    from mixgrpo.core.config import load_config
    from mixgrpo.core.trainer import Trainer

    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    path = ckpt.latest(root) if checkpoint is None else root / ckpt.iteration_name(int(checkpoint))
    if path is None or not path.is_dir():
        raise SystemExit(f"offpolicy_ratios: no checkpoint {checkpoint or 'latest'} under {root}")
    with tempfile.TemporaryDirectory() as out:
        cfg, pm = load_config(run_dir / "config.gin", [f"TrainConfig.output_dir = '{out}'",
                                                       f"TrainConfig.prompts_per_iteration = {prompts}",
                                                       f"TrainConfig.group_size = {group}",
                                                       "TrainConfig.progress = False", "TrainConfig.trackers = []"])
        trainer = Trainer(cfg, pm)
        names, group_ids, sample_ids = trainer.local_batch(seed)
        plan = trainer.plan(0, sample_ids)
        trainer.backbone.module.eval()
        with torch.no_grad():  # π_b: the base weights
            traj = trainer.rollout_rows(names, group_ids, sample_ids, plan, seed)
            ckpt.load_module_weights(trainer.backbone.unwrapped(), path)
            new = torch.stack([trainer._step_result(traj, step, torch.arange(len(traj)))[0].log_prob.float().cpu()
                               for step in traj.sde_steps], 1)
    delta = (new - traj.log_prob).double()  # [N, K]
    cumulative = delta.cumsum(1)
    sigmas = traj.sigmas.double()
    stds = []  # the step's std s_i = g(σ_i)·√Δ_i (the sampler's; it does not depend on the velocity)
    for k, step in enumerate(traj.sde_steps):
        res = trainer.sde_sampler.step(traj.x[:1, k], torch.zeros_like(traj.x[:1, k]), traj.sigmas, step,
                                       prev_sample=traj.x_next[:1, k])
        stds.append(float(torch.as_tensor(res.std).mean()))
    return {"run": str(run_dir), "checkpoint": path.name, "samples": len(traj), "steps": list(traj.sde_steps),
            "sigma": [float(sigmas[i]) for i in traj.sde_steps], "std": stds,
            "mean_abs_delta": delta.abs().mean(0).tolist(), "max_abs_delta": delta.abs().max(0).values.tolist(),
            "log_weight_std": cumulative.std(0).tolist()}


def format_table(result: dict) -> str:
    lines = [f"{result['run']} ({result['checkpoint']}), {result['samples']} samples drawn by the base model",
             f"{'step':>4} {'sigma':>7} {'std s':>8} {'mean |dlogp|':>13} {'max |dlogp|':>12} "
             f"{'std of log w, tau = step + 1':>28}"]
    for k, step in enumerate(result["steps"]):
        lines.append(f"{step:>4} {result['sigma'][k]:>7.3f} {result['std'][k]:>8.4f} "
                     f"{result['mean_abs_delta'][k]:>13.3e} {result['max_abs_delta'][k]:>12.3e} "
                     f"{result['log_weight_std'][k]:>28.3e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run directory (config.gin and checkpoints/)")
    p.add_argument("--checkpoint", default=None, help="an iteration (default: the latest checkpoint)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--seed", type=int, default=1234, help="the iteration key of the prompts and noise")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    result = measure(args.run, args.checkpoint, args.prompts, args.group, args.seed)
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    if not all(math.isfinite(v) for v in result["log_weight_std"]):
        print("offpolicy_ratios: a log-weight is not finite", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
