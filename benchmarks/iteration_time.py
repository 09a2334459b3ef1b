"""Iteration time of every method preset, measured in one run, reported as ratios to DanceGRPO.

    .venv/bin/python benchmarks/iteration_time.py                 # toy backbone, T = 25 (seconds)
    .venv/bin/python benchmarks/iteration_time.py --backbone shapes --iterations 3

The paper (MixGRPO Table 1, FLUX on 32 GPUs) reports MixGRPO at 0.52 of DanceGRPO's iteration time,
Flash at 0.39 and Flash* at 0.29. The NFE-predicted column prices each method's model calls at the
DanceGRPO run's measured cost per rollout call and per training call, so a gap between predicted and
measured is overhead that NFE accounting does not see.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mixgrpo.core.compare_report import predicted_ratios
from mixgrpo.core.config import load_config
from mixgrpo.core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["dancegrpo", "flowgrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]
BACKBONES = {
    "toy": ["TrainConfig.backbone = 'toy'", "ToyBackbone.size = 16", "ToyBackbone.hidden = 32"],
    "shapes": [f"include '{ROOT / 'experiments/shapes/world.gin'}'", "TrainConfig.eval_every = 0",
               "TrainConfig.sample_every = 0", "TrainConfig.tensorboard = False"],
}


def measure(method: str, backbone: str, iterations: int, group_size: int, prompts: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        bindings = [
            *BACKBONES[backbone],
            "TrainConfig.num_steps = 25", f"TrainConfig.group_size = {group_size}",
            f"TrainConfig.prompts_per_iteration = {prompts}", "TrainConfig.rewards = {'shapes.preference': 1.0}",
            "TrainConfig.progress = False", f"TrainConfig.output_dir = '{out}'",
            "FlowGRPO.kl_beta = 0.0",  # the FLUX recipes compared in the paper train without KL
        ]
        cfg, pm = load_config(ROOT / "experiments" / "methods" / f"{method}.gin", bindings)
        trainer = Trainer(cfg, pm)
        trainer.iteration(0)  # warm-up
        rows = [trainer.iteration(k) for k in range(1, iterations + 1)]
    keys = ["perf/iteration_s", "perf/rollout_s", "perf/train_s", "perf/nfe_rollout", "perf/nfe_train"]
    return {k.split("/")[1]: sum(r[k] for r in rows) / len(rows) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="toy")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    args = parser.parse_args()
    table = {}
    for method in METHODS:
        table[method] = measure(method, args.backbone, args.iterations, args.group_size, args.prompts)
        print(f"measured {method}: {table[method]['iteration_s']:.3f} s/iteration", flush=True)
    ratios = predicted_ratios(table, "dancegrpo")
    print(f"\nbackbone={args.backbone}  T=25  samples/iteration={args.group_size * args.prompts}")
    print(f"{'method':<20} {'s/it':>8} {'NFE roll':>9} {'NFE train':>10} {'measured':>9} {'predicted':>10}")
    for method, row in table.items():
        predicted, measured = ratios[method]
        print(f"{method:<20} {row['iteration_s']:>8.3f} {row['nfe_rollout']:>9.1f} {row['nfe_train']:>10.1f} "
              f"{measured:>9.2f} {predicted:>10.2f}")


if __name__ == "__main__":
    main()
