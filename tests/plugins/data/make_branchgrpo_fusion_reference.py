"""Writes branchgrpo_fusion_reference.json: BranchGRPO's probability-weighted reward fusion
(``--tree_prob_weighted``) as the reference's own functions compute it.

    python tests/plugins/data/make_branchgrpo_fusion_reference.py PATH/TO/fastvideo/train_branchgrpo_flux.py

The file is Fredreic1849/BranchGRPO's (commit below). Its class ``TreeNode`` and its functions
``compute_node_rewards_from_leaves`` and ``compute_hierarchical_advantages_by_depth`` are taken out of
it with ``ast`` and run as they are (the rest of the file needs a GPU stack). Each case builds the tree
the reference's rollout builds for T steps and split points S with two children per split (a root at
depth 0, one child per step, two at a split step), gives every edge a fixed log-prob and every leaf a
fixed reward, and records, per leaf and step, the edge's log-prob, the node it leads into (named by
its first leaf), that node's reward and its advantage.
"""

import ast
import json
import sys
import typing
from pathlib import Path

import numpy as np
import torch

COMMIT = "19fbb9fc92ad1857212f3b664d6e9ff80c8b3804"
WANTED = ("TreeNode", "compute_node_rewards_from_leaves", "compute_hierarchical_advantages_by_depth")
CASES = {"t10_s024": (10, (0, 2, 4), 0), "t8_s15": (8, (1, 5), 1), "t6_s0134": (6, (0, 1, 3, 4), 2)}


def load(path: Path) -> dict:
    src = path.read_text()
    scope = {"torch": torch, "np": np, "main_print": lambda *a, **k: None,  # what the reference's lines use
             **{name: getattr(typing, name) for name in ("Dict", "List", "Optional")}}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in WANTED:
            exec(compile(ast.Module([node], []), str(path), "exec"), scope)  # noqa: S102
    return scope


def case(ref: dict, steps: int, splits: tuple, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    root = ref["TreeNode"]("root", torch.zeros(1), step=0)
    level = [root]
    for i in range(steps):
        nxt = []
        for parent in level:
            for c in range(2 if i in splits else 1):
                child = ref["TreeNode"](f"{parent.node_id}_{i}_{c}", torch.zeros(1), parent=parent, step=i + 1)
                child.log_prob = torch.tensor([float(torch.randn((), generator=gen)) * 0.7 - 2.0])
                parent.add_child(child)
                nxt.append(child)
        level = nxt
    leaves = level
    rewards = torch.rand(len(leaves), generator=gen, dtype=torch.float64).float()
    _, by_depth = ref["compute_node_rewards_from_leaves"](root, rewards, leaves, use_prob_weighted=True)
    ref["compute_hierarchical_advantages_by_depth"](by_depth)
    first = {}
    for k, leaf in enumerate(leaves):
        for node in leaf.get_path_from_root()[1:]:
            first.setdefault(node.node_id, k)
    rows = [leaf.get_path_from_root()[1:] for leaf in leaves]
    return {"num_steps": steps, "split_points": list(splits), "leaf_rewards": rewards.tolist(),
            "log_prob": [[float(n.log_prob.squeeze()) for n in path] for path in rows],
            "edges": [[first[n.node_id] for n in path] for path in rows],
            "node_rewards": [[float(n.reward) for n in path] for path in rows],
            "advantages": [[float(n.advantage) for n in path] for path in rows]}


def main(path: str) -> None:
    ref = load(Path(path))
    data = {"source": {"repo": "Fredreic1849/BranchGRPO", "path": "fastvideo/train_branchgrpo_flux.py",
                       "commit": COMMIT, "functions": list(WANTED),
                       "how": "TreeNode and the two functions exec'd from the file as they are; trees with two "
                              "children per split, fixed edge log-probs and leaf rewards; use_prob_weighted=True"},
            "cases": {name: case(ref, *spec) for name, spec in CASES.items()}}
    out = Path(__file__).with_name("branchgrpo_fusion_reference.json")
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
