"""The shapes demo, shortened: every method preset on the shipped shapes model for three iterations.

``run_methods`` is what ``tests/core/test_demo_regression.py`` runs and compares with
``demo_iterations.json``, which this file writes when run as a script:

    .venv/bin/python tests/core/golden/demo_run.py     # only when a change is MEANT to change results

The numbers are a regression record, not a reference: they were produced by this project's code at
a commit whose full demo reproduced the README's rewards, and they pin every piece the demo's
results depend on (noise keys, grids, solvers, SDE log-probs, advantages, minibatch order, AdamW).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).with_name("demo_iterations.json")
METHODS = ("flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star")
# the demo's own settings (experiments/shapes/world.gin) at a third of its batch, without evaluation
BINDINGS = (
    "TrainConfig.iterations = 3",
    "TrainConfig.prompts_per_iteration = 2",
    "TrainConfig.group_size = 4",
    "TrainConfig.micro_batch_size = 4",
    "TrainConfig.eval_every = 0",
    "TrainConfig.sample_every = 0",
    "TrainConfig.checkpoint_every = 0",
    "TrainConfig.progress = False",
    "TrainConfig.tensorboard = False",
    # moves the progressive window every iteration, so three iterations see three windows
    "ProgressiveWindow.shift_interval = 1",
)
RECORDED = ("reward/shapes.composition/mean", "reward/shapes.composition/std", "loss/policy",
            "policy/grad_norm", "policy/ratio_mean", "window/start", "perf/nfe_rollout", "perf/nfe_train")


def run_methods(out: Path) -> dict[str, dict]:
    from mixgrpo.core.config import load_config
    from mixgrpo.core.trainer import Trainer

    results = {}
    for method in METHODS:
        bindings = [f"include 'methods/{method}.gin'", *BINDINGS, f"TrainConfig.output_dir = '{out / method}'"]
        config, pm = load_config(ROOT / "experiments" / "shapes" / "world.gin", bindings)
        trainer = Trainer(config, pm)
        rows = trainer.train()
        trainer.close()
        params = [p.detach().double() for p in trainer.backbone.trainable_parameters()]
        results[method] = {
            "iterations": [{k: row[k] for k in RECORDED} for row in rows],
            "weights_sum": float(sum(p.sum() for p in params)),
            "weights_sq_sum": float(sum((p * p).sum() for p in params)),
        }
    return results


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(run_methods(Path(tmp)), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
