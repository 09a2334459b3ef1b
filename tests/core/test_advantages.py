"""Group-relative advantages (docs/algorithms.md §7) against numpy re-derivations and hand cases."""

import math

import numpy as np
import pytest
import torch

from mixgrpo.core.advantages import group_advantages, local_rows, zero_std_fraction


def numpy_reference(rewards, groups, *, std="group", ddof=1, eps=1e-8, clip=None):
    """Loop-by-group re-derivation (NaN-free input)."""
    r, g = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    out = np.zeros_like(r)
    for gid in np.unique(g):
        idx = g == gid
        spread = np.std(r[idx], ddof=ddof) if std == "group" else np.std(r, ddof=ddof)
        out[idx] = (r[idx] - r[idx].mean()) / (spread + eps)
    return np.clip(out, -clip, clip) if clip is not None else out


def batch(seed=0, groups=5, size=6, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), size)
    r = rng.normal(shift, scale, size=groups * size) + g * 0.7  # group means differ
    return torch.tensor(r, dtype=torch.float32), torch.tensor(g)


# -- one reward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ddof", [0, 1])
def test_group_std_matches_numpy(ddof):
    r, g = batch()
    adv = group_advantages(r, g, std="group", ddof=ddof, clip=None)
    assert adv.dtype == torch.float32 and adv.shape == (30,)
    np.testing.assert_allclose(adv.numpy(), numpy_reference(r.numpy(), g.numpy(), ddof=ddof), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ddof", [0, 1])
def test_global_std_matches_numpy(ddof):
    r, g = batch(seed=1)
    adv = group_advantages(r, g, std="global", ddof=ddof, eps=1e-4, clip=None)
    ref = numpy_reference(r.numpy(), g.numpy(), std="global", ddof=ddof, eps=1e-4)
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-5, atol=1e-6)
    # global std ≠ group std: the group means differ, so the global std is larger here
    assert not np.allclose(adv.numpy(), numpy_reference(r.numpy(), g.numpy(), ddof=ddof, eps=1e-4))


def test_hand_case_group_of_three():
    # rewards 1, 2, 3: mean 2, unbiased std 1 → −1, 0, 1; population std √(2/3) → ∓1.2247
    r, g = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 0])
    torch.testing.assert_close(group_advantages(r, g, eps=0.0), torch.tensor([-1.0, 0.0, 1.0]))
    s = math.sqrt(1.5)
    torch.testing.assert_close(group_advantages(r, g, ddof=0, eps=0.0), torch.tensor([-s, 0.0, s]))


def test_eps_is_added_to_the_std():
    r, g = torch.tensor([1.0, 3.0]), torch.tensor([7, 7])  # std (ddof 1) = √2
    adv = group_advantages(r, g, eps=0.5)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + 0.5))


@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-4])
@pytest.mark.parametrize("std", ["group", "global"])
def test_constant_group_gives_zero_not_nan(eps, std):
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.1, 0.7])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(r, g, std=std, eps=eps)
    assert torch.isfinite(adv).all()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    everything_equal = group_advantages(torch.full((6,), 22.3), g, std=std, eps=eps)
    assert everything_equal.tolist() == [0.0] * 6


def test_group_of_one_with_ddof_one_gives_zero():
    r, g = torch.tensor([5.0, 1.0, 2.0, 3.0]), torch.tensor([9, 1, 1, 1])
    adv = group_advantages(r, g, ddof=1, eps=0.0)
    assert adv[0] == 0.0
    torch.testing.assert_close(adv[1:], torch.tensor([-1.0, 0.0, 1.0]))


def test_clip_at_five():
    # one outlier in a group of 100: z = 99/√99·… far beyond 5 before clipping
    r = torch.zeros(100)
    r[0] = 1.0
    g = torch.zeros(100, dtype=torch.long)
    raw = group_advantages(r, g, clip=None)
    assert raw[0] > 9.0
    clipped = group_advantages(r, g)
    assert clipped[0] == 5.0
    torch.testing.assert_close(clipped[1:], raw[1:])
    assert group_advantages(-r, g)[0] == -5.0


def test_nan_rewards_are_masked_out_of_the_statistics():
    r = torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0, 8.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = group_advantages(r, g, eps=0.0)
    assert adv[1] == 0.0
    torch.testing.assert_close(adv[[0, 2, 3]], torch.tensor([-1.0, 0.0, 1.0]))  # as if the NaN were absent
    s = np.std([4.0, 8.0], ddof=1)
    torch.testing.assert_close(adv[4:], torch.tensor([-2.0 / s, 2.0 / s], dtype=torch.float32))
    glob = group_advantages(r, g, std="global", ddof=0, eps=0.0)
    spread = np.std([1.0, 2.0, 3.0, 4.0, 8.0])
    torch.testing.assert_close(glob, torch.tensor([-1 / spread, 0, 0, 1 / spread, -2 / spread, 2 / spread],
                                                  dtype=torch.float32))


def test_all_nan_group_gives_zero():
    r = torch.tensor([float("nan")] * 3 + [1.0, 2.0, 3.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(r, g, eps=0.0)
    assert adv[:3].tolist() == [0.0] * 3 and torch.isfinite(adv).all()


# -- several rewards -------------------------------------------------------------------------------
def test_advantage_aggregate_equal_weights_is_the_mean():
    a, g = batch(seed=2)
    b, _ = batch(seed=3, scale=10.0)
    c, _ = batch(seed=4, scale=0.01, shift=22.0)
    rewards = {"hps": a, "pick": b, "ir": c}
    each = [group_advantages(x, g, clip=None) for x in (a, b, c)]
    mixed = group_advantages(rewards, g, clip=None)
    torch.testing.assert_close(mixed, sum(each) / 3)  # average = sum / K
    weighted = group_advantages(rewards, g, clip=None, weights={"hps": 2.0, "pick": 1.0, "ir": 1.0})
    torch.testing.assert_close(weighted, 0.5 * each[0] + 0.25 * each[1] + 0.25 * each[2])


def test_reward_aggregate_sums_raw_rewards_then_normalizes():
    a, g = batch(seed=5)
    b, _ = batch(seed=6)
    got = group_advantages({"a": a, "b": b}, g, weights={"a": 1.0, "b": 3.0}, aggregate="reward",
                           std="global", ddof=0, eps=1e-4, clip=None)
    total = a.double().numpy() + 3.0 * b.double().numpy()
    ref = numpy_reference(total, g.numpy(), std="global", ddof=0, eps=1e-4)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_reward_scale_does_not_dominate_under_advantage_aggregation():
    """Hand case: reward "big" (scale 100) ranks the samples 1 < 2 < 3, reward "small" (scale 1)
    ranks them 3 < 2 < 1. Summing raw rewards lets "big" decide; averaging advantages does not."""
    g = torch.tensor([0, 0, 0])
    rewards = {"big": torch.tensor([100.0, 200.0, 300.0]), "small": torch.tensor([3.0, 2.0, 1.0])}
    by_reward = group_advantages(rewards, g, aggregate="reward", eps=0.0)
    by_adv = group_advantages(rewards, g, aggregate="advantage", eps=0.0)
    # sum = 103, 202, 301: mean 202, unbiased std 99 → −1, 0, 1: "big" alone decides
    torch.testing.assert_close(by_reward, torch.tensor([-1.0, 0.0, 1.0]))
    # per-reward z-scores −1, 0, 1 and 1, 0, −1 cancel: neither reward dominates
    torch.testing.assert_close(by_adv, torch.zeros(3))


def test_nan_in_one_reward_under_each_aggregate():
    g = torch.tensor([0, 0, 0, 0])
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0, float("nan")]), "b": torch.tensor([4.0, 1.0, 2.0, 3.0])}
    by_adv = group_advantages(rewards, g, eps=0.0)
    a_adv = torch.tensor([-1.0, 0.0, 1.0, 0.0])  # the NaN sample gets 0 for reward a
    b_ref = numpy_reference([4.0, 1.0, 2.0, 3.0], [0, 0, 0, 0], eps=0.0)
    torch.testing.assert_close(by_adv, (a_adv + torch.tensor(b_ref, dtype=torch.float32)) / 2)
    by_reward = group_advantages(rewards, g, aggregate="reward", eps=0.0)
    assert by_reward[3] == 0.0  # NaN sum: excluded
    torch.testing.assert_close(by_reward[:3], torch.tensor(numpy_reference([5.0, 3.0, 5.0], [0] * 3, eps=0.0),
                                                           dtype=torch.float32))


# -- errors ----------------------------------------------------------------------------------------
def test_errors():
    r, g = torch.ones(4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.ones(3), g)
    with pytest.raises(ValueError, match="shape"):
        group_advantages({"a": r, "b": torch.ones(5)}, g)
    with pytest.raises(ValueError, match="unknown std mode"):
        group_advantages(r, g, std="batch")
    with pytest.raises(ValueError, match="unknown aggregate"):
        group_advantages(r, g, aggregate="mean")
    with pytest.raises(ValueError, match=r"unknown rewards \['c'\]"):
        group_advantages({"a": r, "b": r}, g, weights={"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="no weight"):
        group_advantages({"a": r, "b": r}, g, weights={"a": 1.0})
    with pytest.raises(ValueError, match="integers"):
        group_advantages(r, g.float())
    with pytest.raises(ValueError, match="empty"):
        group_advantages({}, g)


# -- monitoring and distributed layouts ------------------------------------------------------------
def test_zero_std_fraction():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 5.0, 5.0, float("nan"), 3.0, float("nan")])
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    # group 0 constant, group 1 not, group 2 constant once the NaN is ignored, group 3 one value
    assert zero_std_fraction(r, g) == pytest.approx(3 / 4)
    assert zero_std_fraction(torch.tensor([1.0, 2.0]), torch.tensor([0, 0])) == 0.0
    assert math.isnan(zero_std_fraction(torch.tensor([float("nan")]), torch.tensor([0])))


def test_whole_groups_per_process_need_no_gather():
    """Group mode: each simulated process normalizes only its own groups and gets the single-process
    advantages, for every reward aggregate."""
    a, g = batch(seed=7, groups=6, size=4)
    b, _ = batch(seed=8, groups=6, size=4, scale=3.0)
    rewards = {"a": a, "b": b}
    single = group_advantages(rewards, g)
    for rank in range(2):
        rows = torch.nonzero(g % 2 == rank).squeeze(1)  # groups 0, 2, 4 on rank 0; 1, 3, 5 on rank 1
        local = group_advantages({k: v[rows] for k, v in rewards.items()}, g[rows])
        torch.testing.assert_close(local, single[rows])


def test_group_spanning_processes_gather_then_select():
    """A group split over two processes (FlowGRPO layout) and the global std: gathering every
    process's rewards and ids, normalizing, then keeping the local rows equals one process."""
    r, g = batch(seed=9, groups=4, size=6)
    sample_ids = torch.arange(24)
    single = group_advantages(r, g, std="global", ddof=0, eps=1e-4)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    shards = [perm[:12], perm[12:]]  # every group lands on both processes
    assert all(len(set(g[s].tolist())) == 4 for s in shards)
    gathered_r = torch.cat([r[s] for s in shards])  # what all_gather returns, rank order
    gathered_g = torch.cat([g[s] for s in shards])
    gathered_ids = torch.cat([sample_ids[s] for s in shards])
    adv_all = group_advantages(gathered_r, gathered_g, std="global", ddof=0, eps=1e-4)
    for shard in shards:
        mine = adv_all[local_rows(gathered_ids, sample_ids[shard])]
        torch.testing.assert_close(mine, single[shard])
    # normalizing one shard alone would be wrong: a group's statistics need all its members
    alone = group_advantages(r[shards[0]], g[shards[0]], std="global", ddof=0, eps=1e-4)
    assert not torch.allclose(alone, single[shards[0]])


def test_local_rows():
    all_ids = torch.tensor([10, 3, 7, 42])
    assert local_rows(all_ids, torch.tensor([7, 10])).tolist() == [2, 0]
    with pytest.raises(ValueError, match="not in the gathered"):
        local_rows(all_ids, torch.tensor([5]))
    with pytest.raises(ValueError, match="duplicate"):
        local_rows(torch.tensor([1, 1]), torch.tensor([1]))
