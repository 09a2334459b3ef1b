"""``ObjectiveContract``: the tests every ``PolicyObjective`` plugin must pass.

Subclass it in a test module, name the subclass ``Test…`` and override ``make_objective``::

    class TestMyObjective(ObjectiveContract):
        def make_objective(self):
            return MyObjective(clip_range=1e-3)

Checked (docs/algorithms.md §7, §8):

- ``advantages``: shape ``[N]``, float, finite; zero mean within each group (override
  ``zero_mean_groups = False`` for an objective with another baseline); independent of the order
  of the samples; ``step_advantages`` ``[N, K]`` equals them on every step where each sample holds
  its own transitions (no tree);
- ``loss`` at ratio 1 (new log-probs equal the old ones): ``terms = −A (+ β·kl)`` and the gradient
  of ``sum(terms)`` w.r.t. the new log-probs is ``−A``; slightly off-policy inside the clip range
  it is ``−A·r``;
- with ``kl_beta > 0``, ``kl`` is implemented: zero for equal step means, growing as they part;
- ``stats`` has ``ratio``, ``clipped``, ``approx_kl``, ``policy`` and ``kl``, each a detached
  ``[M]`` tensor; at ratio 1: ratio 1, nothing clipped, approx_kl 0;
- ``at_iteration(k)`` is an objective of the same class at every iteration;
- ``advantages_use_log_probs`` is a bool, and when True ``step_advantages`` takes ``log_prob=``;
- ``replay`` is None (on-policy) or a ``ReplaySpec`` (OP-GRPO's buffer, core/replay.py), the same on
  every read (the trainer reads it once);
- the constructor contract (``PolicyObjective``): the constructor takes the keyword ``weights``, keeps
  it as ``weights``, and the weights reach the advantages of several rewards. The objective is rebuilt
  with other weights by ``with_weights`` (``attrs.evolve`` for an attrs class, else
  ``type(objective)(weights=...)``): override it when the constructor needs other arguments.

Rewards are named after the objective's ``weights`` when it has any, else ``"reward"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch

from mixgrpo.core.interfaces import PolicyObjective, check_objective_factory
from mixgrpo.core.types import ReplaySpec

STAT_KEYS = ("ratio", "clipped", "approx_kl", "policy", "kl")


class ObjectiveContract:
    """Generic tests for a ``PolicyObjective``. Subclasses override ``make_objective``."""

    #: groups and samples per group of the test batch
    num_groups: int = 4
    group_size: int = 6
    #: whether advantages have zero mean within each group
    zero_mean_groups: bool = True

    def make_objective(self) -> PolicyObjective:
        """Return the objective under test (override in the subclass)."""
        raise NotImplementedError(f"{type(self).__name__} must override make_objective()")

    # -- the problem ---------------------------------------------------------------------------
    def reward_names(self, objective: PolicyObjective) -> list[str]:
        return list(objective.weights) if objective.weights else ["reward"]

    def with_weights(self, objective: PolicyObjective, weights: Mapping[str, float] | None) -> PolicyObjective:
        """``objective`` built again with ``weights``, as the trainer passes them (override when its
        constructor needs arguments that ``type(objective)(weights=...)`` does not give)."""
        if attrs.has(type(objective)):
            return attrs.evolve(objective, weights=weights)
        return type(objective)(weights=weights)

    def batch(self, objective: PolicyObjective, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rewards ``{name: [N]}`` (moderate, so no advantage clipping) and group ids ``[N]``."""
        gen = torch.Generator().manual_seed(seed)
        n = self.num_groups * self.group_size
        group_ids = torch.arange(self.num_groups).repeat_interleave(self.group_size)
        rewards = {name: torch.randn(n, generator=gen) * (k + 1) + k for k, name in
                   enumerate(self.reward_names(objective))}
        return rewards, group_ids

    def transitions(self, objective: PolicyObjective, seed: int = 1):
        """``(log_prob_old [M], advantages [M], kl [M] or None)`` for M transitions."""
        gen = torch.Generator().manual_seed(seed)
        m = 12
        old = torch.randn(m, generator=gen) - 3.0
        adv = torch.randn(m, generator=gen)
        adv[0] = 0.0  # a zero advantage must give a zero policy term
        kl = torch.rand(m, generator=gen) if objective.kl_beta > 0 else None
        return old, adv, kl

    # -- what the objective asks of the trainer ---------------------------------------------------
    def test_step_advantages_take_the_log_probs_when_they_ask_for_them(self):
        objective = self.make_objective()
        assert isinstance(objective.advantages_use_log_probs, bool)
        if objective.advantages_use_log_probs:
            rewards, group_ids = self.batch(objective)
            edges = torch.arange(len(group_ids))[:, None].repeat(1, 3)
            adv = objective.step_advantages(rewards, group_ids, edges, log_prob=torch.zeros(len(group_ids), 3))
            assert adv.shape == (len(group_ids), 3)

    def test_the_objective_of_every_iteration_is_one_of_its_kind(self):
        objective = self.make_objective()
        for k in (0, 1, 1000):
            assert isinstance(objective.at_iteration(k), type(objective))

    def test_replay_is_none_or_a_replay_spec(self):
        objective = self.make_objective()
        spec = objective.replay
        assert spec is None or isinstance(spec, ReplaySpec), f"replay must be None or a ReplaySpec, got {spec!r}"
        assert objective.replay == spec

    # -- the constructor contract ---------------------------------------------------------------
    def test_constructor_takes_reward_weights(self):
        """The trainer builds every objective with ``weights=dict(TrainConfig.rewards)``: the keyword is
        taken, kept as ``weights``, and changing the weights of two rewards changes the advantages."""
        objective = self.make_objective()
        check_objective_factory(type(objective))  # a clear error naming the contract, not a TypeError
        gen = torch.Generator().manual_seed(5)
        n = self.num_groups * self.group_size
        group_ids = torch.arange(self.num_groups).repeat_interleave(self.group_size)
        rewards = {"first": torch.randn(n, generator=gen), "second": 3.0 * torch.randn(n, generator=gen)}
        advantages = {}
        for key, weights in (("equal", None), ("even", {"first": 1.0, "second": 1.0}),
                             ("second", {"first": 1.0, "second": 4.0})):
            weighted = self.with_weights(objective, weights)
            assert weighted.weights == weights, f"{type(objective).__name__} does not keep its weights as .weights"
            advantages[key] = weighted.advantages(rewards, group_ids)
            assert advantages[key].shape == group_ids.shape and torch.isfinite(advantages[key]).all()
        assert not torch.allclose(advantages["even"], advantages["second"]), \
            f"{type(objective).__name__}'s advantages ignore the reward weights"

    # -- the KL term ------------------------------------------------------------------------------
    def test_kl_when_the_objective_uses_a_reference(self):
        """An objective with ``kl_beta > 0`` implements ``kl``: ``[B]``, zero when the policy's and
        the reference's step means agree, positive and growing when they move apart."""
        from mixgrpo.core.types import StepResult

        objective = self.make_objective()
        if not objective.uses_reference:
            assert objective.kl_beta == 0
            return
        sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0])
        gen = torch.Generator().manual_seed(3)
        x, mean = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
        step = StepResult(prev_sample=x, mean=mean, std=torch.full((3, 1, 1, 1), 0.3), log_prob=torch.zeros(3))
        same = objective.kl(step, step, sigmas, 1)
        assert same.shape == (3,) and torch.allclose(same, torch.zeros(3))
        near = StepResult(prev_sample=x, mean=mean + 0.01, std=step.std, log_prob=step.log_prob)
        far = StepResult(prev_sample=x, mean=mean + 0.1, std=step.std, log_prob=step.log_prob)
        assert (objective.kl(step, near, sigmas, 1) > 0).all()
        assert (objective.kl(step, far, sigmas, 1) > objective.kl(step, near, sigmas, 1)).all()

    # -- advantages ----------------------------------------------------------------------------
    def test_advantages_shape_dtype_finite(self):
        objective = self.make_objective()
        rewards, group_ids = self.batch(objective)
        adv = objective.advantages(rewards, group_ids)
        assert adv.shape == group_ids.shape
        assert adv.is_floating_point()
        assert torch.isfinite(adv).all()

    def test_advantages_zero_mean_within_groups(self):
        if not self.zero_mean_groups:
            return
        objective = self.make_objective()
        rewards, group_ids = self.batch(objective)
        adv = objective.advantages(rewards, group_ids).double()
        for g in group_ids.unique():
            assert abs(float(adv[group_ids == g].mean())) < 1e-5

    def test_step_advantages_without_a_tree_are_the_sample_advantages(self):
        """Where every row holds its own transitions (``edge_ids`` = sample ids), ``step_advantages``
        ``[N, K]`` is ``advantages`` on every step, what the trainer trains each transition with."""
        objective = self.make_objective()
        rewards, group_ids = self.batch(objective)
        edge_ids = torch.arange(len(group_ids))[:, None].repeat(1, 3)
        extra = {"log_prob": torch.zeros(edge_ids.shape)} if objective.advantages_use_log_probs else {}
        per_step = objective.step_advantages(rewards, group_ids, edge_ids, **extra)
        assert per_step.shape == (len(group_ids), 3)
        torch.testing.assert_close(per_step, objective.advantages(rewards, group_ids)[:, None].expand(-1, 3),
                                   atol=1e-6, rtol=1e-6)

    def test_advantages_follow_their_samples(self):
        objective = self.make_objective()
        rewards, group_ids = self.batch(objective)
        perm = torch.randperm(len(group_ids), generator=torch.Generator().manual_seed(3))
        adv = objective.advantages(rewards, group_ids)
        shuffled = objective.advantages({k: v[perm] for k, v in rewards.items()}, group_ids[perm])
        torch.testing.assert_close(shuffled, adv[perm], atol=1e-6, rtol=1e-6)

    # -- loss ----------------------------------------------------------------------------------
    def test_loss_at_ratio_one_is_minus_advantage(self):
        objective = self.make_objective()
        old, adv, kl = self.transitions(objective)
        new = old.clone().requires_grad_(True)
        terms, _ = objective.loss(new, old, adv, kl)
        expected = -adv + (objective.kl_beta * kl if kl is not None else 0.0)
        assert terms.shape == old.shape
        torch.testing.assert_close(terms.detach(), expected, atol=1e-6, rtol=1e-6)

    def test_gradient_at_ratio_one_is_minus_advantage(self):
        objective = self.make_objective()
        old, adv, kl = self.transitions(objective)
        new = old.clone().requires_grad_(True)
        terms, _ = objective.loss(new, old, adv, kl)
        terms.sum().backward()
        torch.testing.assert_close(new.grad, -adv, atol=1e-6, rtol=1e-6)

    def test_gradient_inside_the_clip_range_is_minus_advantage_times_ratio(self):
        objective = self.make_objective()
        old, adv, kl = self.transitions(objective)
        # log-ratios within ±ε/2: the unclipped branch is active everywhere
        shift = torch.linspace(-0.5, 0.5, len(old)) * objective.clip_range
        new = (old + shift).requires_grad_(True)
        terms, stats = objective.loss(new, old, adv, kl)
        terms.sum().backward()
        ratio = torch.exp(new.detach() - old)
        torch.testing.assert_close(new.grad, -adv * ratio, atol=1e-6, rtol=1e-5)
        assert float(stats["clipped"].sum()) == 0.0

    def test_stats_keys_shapes_and_values_at_ratio_one(self):
        objective = self.make_objective()
        old, adv, kl = self.transitions(objective)
        new = old.clone().requires_grad_(True)
        _, stats = objective.loss(new, old, adv, kl)
        assert set(STAT_KEYS) <= set(stats)
        for key in STAT_KEYS:
            assert stats[key].shape == old.shape, key
            assert not stats[key].requires_grad, key
        torch.testing.assert_close(stats["ratio"], torch.ones_like(old))
        assert float(stats["clipped"].abs().sum()) == 0.0
        assert float(stats["approx_kl"].abs().sum()) == 0.0
        torch.testing.assert_close(stats["policy"], -adv, atol=1e-6, rtol=1e-6)
