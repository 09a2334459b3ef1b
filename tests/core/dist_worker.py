"""Run by test_distributed.py under torchrun (gloo, CPU) or alone: one iteration, results saved.

Usage: python dist_worker.py METHOD OUT_DIR
"""

import sys
from pathlib import Path

import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.scoring import score
from mixgrpo.core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.core.conftest import TOY  # noqa: E402


def main(method: str, out: Path) -> None:
    bindings = [*TOY, "TrainConfig.prompts_per_iteration = 4", "TrainConfig.group_size = 3",
                "TrainConfig.num_minibatches = 1", f"TrainConfig.output_dir = '{out}/run'"]
    if method == "op_grpo":  # the same 4 prompts every iteration: the second replays from the buffer
        bindings += ["ShapesPrompts.pool = 4", "OPGRPO.kl_beta = 0.0"]
    cfg, pm = load_config(ROOT / "experiments" / "methods" / f"{method}.gin", bindings)
    trainer = Trainer(cfg, pm)
    acc = trainer.accelerator
    prompts, group_ids, sample_ids = trainer.local_batch(0)
    # the advantages the iteration will use, computed as the trainer does
    from mixgrpo.core.rollout import rollout

    plan = trainer.plan(0, sample_ids)
    traj = rollout(trainer.backbone, prompts, group_ids, sample_ids, plan, setup=trainer.setup,
                   sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver, post_solver=trainer.post_solver,
                   seed=cfg.seed, iteration=0, batch_size=cfg.rollout_batch_size)
    rewards = score(trainer.rewards, traj.images, prompts)
    advantages = trainer.advantages(rewards, traj)
    rows = [trainer.iteration(k) for k in range(2 if trainer.replay is not None else 1)]
    weights = [p.detach().cpu().clone() for p in trainer.backbone.trainable_parameters()]
    buffer = None if trainer.replay is None else {
        str(p): (e.reward, e.iteration, e.states, e.log_prob) for p, e in trainer.replay.entries.items()}
    torch.save({"sample_ids": sample_ids, "group_ids": group_ids, "advantages": advantages,
                "rewards": rewards, "weights": weights, "world": acc.num_processes, "buffer": buffer,
                "replayed": rows[-1].get("replay/fraction")}, out / f"rank{acc.process_index}.pt")
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
