"""Run by test_fsdp.py, alone or under torchrun (gloo, CPU): train the tiny FLUX, save what happened.

Usage: python fsdp_worker.py PARALLELISM FLUX_DIR RUN_DIR ITERATIONS [--resume] [--bf16] [--checkpointing]

Writes ``RUN_DIR/rank<r>.pt``: the advantages of iteration 0 by global sample id, the whole final
weights (gathered from the shards under FSDP), and for every trainable parameter whether it is
sharded and how many of its elements this process holds.
"""

import sys
from pathlib import Path

import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.parallel import full_tensor, is_sharded
from mixgrpo.core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def main(parallelism: str, flux_dir: str, run: Path, iterations: int, flags: list[str]) -> None:
    dtype = "bfloat16" if "--bf16" in flags else "float32"
    bindings = [
        "TrainConfig.backbone = 'flux'", f"FluxBackbone.path = '{flux_dir}'", f"FluxBackbone.dtype = '{dtype}'",
        f"FluxBackbone.gradient_checkpointing = {'--checkpointing' in flags}",
        f"TrainConfig.parallelism = '{parallelism}'", "TrainConfig.num_steps = 4", "TrainConfig.group_size = 2",
        "TrainConfig.prompts_per_iteration = 2", "TrainConfig.rollout_batch_size = 4",
        "TrainConfig.micro_batch_size = 2", f"TrainConfig.iterations = {iterations}",
        "TrainConfig.checkpoint_every = 1", "TrainConfig.learning_rate = 1e-4", "TrainConfig.progress = False",
        "TrainConfig.tensorboard = False", "TrainConfig.rewards = {'shapes.preference': 1.0}",
        "ProgressiveWindow.window_size = 2", f"TrainConfig.output_dir = '{run}'",
        # evaluation and grids run their forward passes on every process under FSDP (shards are gathered)
        "TrainConfig.eval_every = 1", "TrainConfig.eval_prompts = 2", "TrainConfig.eval_seeds = 1",
        "TrainConfig.sample_every = 1", "TrainConfig.sample_prompts = 2",
    ]
    cfg, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin", bindings)
    trainer = Trainer(cfg, pm)
    acc = trainer.accelerator
    advantages: dict[int, float] = {}
    compute = trainer.advantages

    def record(rewards, traj, *iteration):
        adv = compute(rewards, traj, *iteration)
        if not advantages:  # the first iteration this run trains; per sample (every step's column is
            # the sample's advantage when the group is no tree: ObjectiveContract checks it)
            advantages.update(zip(traj.sample_ids.tolist(), (adv if adv.dim() == 1 else adv[:, 0]).tolist()))
        return adv

    trainer.advantages = record
    trainer.train("resume" if "--resume" in flags else "new")
    params = trainer.backbone.trainable_parameters()
    weights = [full_tensor(p.detach()).cpu().clone() for p in params]
    shards = [(is_sharded(p), (p.to_local() if is_sharded(p) else p).numel(), w.numel())
              for p, w in zip(params, weights)]
    names = [n for n, p in trainer.backbone.unwrapped().named_parameters() if p.requires_grad]
    torch.save({"world": acc.num_processes, "names": names, "advantages": advantages, "weights": weights,
                "shards": shards, "parallelism": trainer.parallel.kind}, run / f"rank{acc.process_index}.pt")
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
