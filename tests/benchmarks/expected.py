"""NFE per sample that the method presets predict (experiments/methods/*.gin), written out by hand
from the presets' numbers: windows of w = 4 steps; MixGRPO's window starts at min(k // 25, T − w) at
iteration k, Flash's at min(k // 20, T − w), Flash*'s at 0; Flash compresses the steps after the
window's last step L to n = max(int((T − L)·r), 2) grid points (r = 0.4, Flash* 0.2). Every preset
but FlowGRPO shares the initial noise within a group, so the model calls up to and including the
first SDE step are paid once per group (``share_prefix``), in the rollout and, at that step, in
training (one minibatch: once per group that trains it).

The newer presets share no initial noise and compress no grid, so they walk all T steps per sample
in the rollout: Flow-GRPO-Fast trains its window of w = 2 SDE steps; the forward-process objectives
re-noise each final sample at K drawn σ and call the network K times before the update (v_old, no
grad), K times with grad (v_new) and, with a KL term, K times on the frozen reference (v_ref):
DiffusionNFT K = 4 without KL (2·K = 8), AWM K = 6 with KL β = 1e-4 (3·K = 18). OP-GRPO is FlowGRPO's
preset with a replay buffer: a replayed sample walks T − τ steps and recomputes its τ reused steps'
log-probs (no grad, during the rollout), so every sample costs T in the rollout, replayed or not, and
trains FlowGRPO's T − 1 steps. BranchGRPO's trees (its reference's splits 0, 3, 6, 9 of 20 steps scaled
to T, as many as the group's leaves need) walk each node once and train each node once per trained
step; TempFlow-GRPO's group is its trunk's 6·⌊0.99·T⌋ branches, whatever the run's group size."""

import math

WINDOW = 4
PAPER_METHODS = ("flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star")
METHODS = ("flowgrpo", "flowgrpo_fast", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star",
           "diffusionnft", "awm", "op_grpo", "branchgrpo", "branchgrpo_mix", "tempflow_grpo")
TREES = ("branchgrpo", "branchgrpo_mix")
MIX_WINDOW = 4  # BranchGRPO-Mix: SDE steps 0 .. 3 and the split steps


def splits(T: int, group_size: int) -> list[int]:
    """BranchGRPO's split steps in the benchmark: the reference's 0, 3, 6, 9 of 20 steps scaled to T,
    as many as a tree of group_size leaves (two children each) needs."""
    return [round(s * T / 20) for s in (0, 3, 6, 9)][:group_size.bit_length() - 1]


def tree_nodes(T: int, group_size: int) -> list[int]:
    """Model rows per group at each step of a tree: 2 to the number of splits before the step."""
    cut = splits(T, group_size)
    return [2 ** sum(s < i for s in cut) for i in range(T)]


def tree_trained(method: str, T: int, group_size: int) -> list[int]:
    """The SDE (trained) steps of a tree preset: every step, or (Mix) the window 0 .. 3 and the splits."""
    if method == "branchgrpo":
        return list(range(T))
    return sorted(set(range(MIX_WINDOW)) | set(splits(T, group_size)))


def trunk_steps(T: int) -> int:
    """TempFlow-GRPO's branch steps: 0 .. ⌊0.99·T⌋ − 1, 6 samples each (its group: 6 per step)."""
    return int(0.99 * T)
SHARED_NOISE = ("dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star")
FAST_WINDOW = 2  # Flow-GRPO-Fast: FastWindow.window_size
# forward-process presets: (K σ draws per sample, network calls per draw: v_old + v_new [+ v_ref])
FORWARD = {"diffusionnft": (4, 2), "awm": (6, 3)}


def window_start(method: str, T: int, iteration: int) -> int:
    every = {"mixgrpo": 25, "mixgrpo_flash": 20}.get(method)
    return min(iteration // every, T - WINDOW) if every else 0


def rollout_steps(method: str, T: int, iteration: int = 0) -> int:
    ratio = {"mixgrpo_flash": 0.4, "mixgrpo_flash_star": 0.2}.get(method)
    if ratio is None:
        return T
    last = window_start(method, T, iteration) + WINDOW - 1
    n_post = max(int((T - last) * ratio), 2)
    compressed = last + n_post  # σ_0 … σ_{L+1}, then n_post − 1 more points
    return compressed if compressed < T else T


def trained_steps(method: str, T: int) -> int:
    if method == "flowgrpo_fast":  # its window of w = 2 SDE steps
        return FAST_WINDOW
    if method in FORWARD:  # K draws × (v_old, v_new[, v_ref]): DiffusionNFT 2·4 = 8, AWM 3·6 = 18
        draws, calls = FORWARD[method]
        return draws * calls
    if method in ("flowgrpo", "op_grpo"):  # every step but the last (train_fraction 0.99)
        return min(math.floor(0.99 * T + 1e-9), T - 1)
    if method == "dancegrpo":  # a random 60% of steps 0..T-2 per sample
        return math.floor(0.6 * (T - 1) + 1e-9)
    return WINDOW


def trained_calls_without_grad(method: str) -> int:
    """Training calls per sample without gradients: the forward-process presets' v_old (K) and, with
    the KL, v_ref (K): DiffusionNFT 4, AWM 2·6 = 12; none in the GRPO presets (run without KL)."""
    if method not in FORWARD:
        return 0
    draws, calls = FORWARD[method]
    return draws * (calls - 1)


def shared_calls(method: str, T: int, iteration: int = 0) -> int:
    """Model calls a group's samples share: every step up to the first SDE step, and that step's."""
    return window_start(method, T, iteration) + 1 if method in SHARED_NOISE else 0


def rollout_calls(method: str, T: int, group_size: int, iteration: int = 0) -> float:
    """Model calls per sample in the rollout: the grid walked, less what a group shares. A tree: its
    rows per step over its leaves. A trunk: T for the trunk and 6·(T − j − 1) for the children of step j."""
    if method in TREES:
        return sum(tree_nodes(T, group_size)) / group_size
    if method == "tempflow_grpo":
        b = trunk_steps(T)
        return (T + 6 * sum(T - j - 1 for j in range(b))) / (6 * b)
    return rollout_steps(method, T, iteration) - shared_calls(method, T, iteration) * (1 - 1 / group_size)


def trained_calls(method: str, T: int, group_size: int, groups: int, iteration: int = 0) -> float:
    """Model calls per sample in training (one minibatch): at the first SDE step one per group that
    trains it, elsewhere one per (sample, trained step)."""
    samples = groups * group_size
    if method in TREES:  # each node once at each trained step
        nodes = tree_nodes(T, group_size)
        return sum(nodes[i] for i in tree_trained(method, T, group_size)) / group_size
    if method == "tempflow_grpo":  # the 6 children of a branch step share one call
        return 1 / 6
    if method not in SHARED_NOISE:
        return trained_steps(method, T)
    if method != "dancegrpo":  # every sample trains its window, whose first step the group shares
        return trained_steps(method, T) - (1 - 1 / group_size)
    from mixgrpo.plugins.schedules.windows import RandomSubset  # its per-sample subsets (seed 0)

    subsets = [RandomSubset(fraction=0.6).steps_for(iteration, T, n) for n in range(samples)]
    at_first = sum(any(0 in subsets[g * group_size + k] for k in range(group_size)) for g in range(groups))
    return (sum(len(s) - (0 in s) for s in subsets) + at_first) / samples
