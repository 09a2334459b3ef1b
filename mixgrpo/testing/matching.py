"""``MatchingObjectiveContract``: the tests every forward-process objective (``MatchingObjective``)
plugin must pass.

Subclass it in a test module, name the subclass ``Test…`` and override ``make_objective``::

    class TestMyObjective(MatchingObjectiveContract):
        def make_objective(self):
            return MyObjective(num_timesteps=3)

Checked (docs/algorithms.md, "Forward-process objectives"):

- ``advantages``: shape ``[N]``, finite, zero mean within each group (for rewards whose advantages
  the objective's advantage clip does not reach);
- ``draw_sigmas``: ``[K, N]`` noise levels in (0, 1], the same for the same generator state;
- ``loss`` while ``v_new == v_old`` (the first minibatch): ``[B]`` finite terms with grad, and the
  statistics ``ratio`` (1), ``clipped`` (0), ``approx_kl`` (0), ``policy`` and ``kl``, each detached
  ``[B]``;
- the direction of learning: a small gradient step on the summed terms moves the velocity of a
  sample with a positive advantage toward its flow-matching target ``ε − x0``, and that of a sample
  with a negative advantage away from it;
- the constructor contract: the keyword ``weights`` is kept and reaches the advantages.
"""

from __future__ import annotations

import attrs
import torch

from mixgrpo.core.interfaces import MatchingObjective, check_objective_factory

STAT_KEYS = ("ratio", "clipped", "approx_kl", "policy", "kl")


class MatchingObjectiveContract:
    """Generic tests for a ``MatchingObjective``. Subclasses override ``make_objective``."""

    num_groups: int = 3
    group_size: int = 4
    latent: tuple[int, ...] = (2, 3, 3)

    def make_objective(self) -> MatchingObjective:
        raise NotImplementedError(f"{type(self).__name__} must override make_objective()")

    # -- the problem ----------------------------------------------------------------------------
    def with_weights(self, objective: MatchingObjective, weights: dict[str, float]) -> MatchingObjective:
        """``objective`` built again with ``weights`` (override when the constructor needs more)."""
        if attrs.has(type(objective)):
            return attrs.evolve(objective, weights=weights)
        return type(objective)(weights=weights)

    def inputs(self, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x0 = torch.randn(n, *self.latent, generator=gen)
        noise = torch.randn(n, *self.latent, generator=gen)
        v_old = torch.randn(n, *self.latent, generator=gen)
        sigma = torch.linspace(0.9, 0.2, n)
        return {"x0": x0, "noise": noise, "v_old": v_old, "sigma": sigma}

    def _loss(self, objective, v_new, data, advantages):
        v_ref = data["v_old"].clone() if objective.uses_reference else None
        return objective.loss(v_new, data["v_old"], data["x0"], data["noise"], data["sigma"], advantages, v_ref)

    # -- advantages and σ draws ------------------------------------------------------------------
    def test_advantages_are_zero_mean_per_group(self):
        objective = self.make_objective()
        n = self.num_groups * self.group_size
        group_ids = torch.arange(self.num_groups).repeat_interleave(self.group_size)
        names = list(objective.weights) if objective.weights else ["reward"]
        gen = torch.Generator().manual_seed(3)
        rewards = {name: torch.rand(n, generator=gen) * 0.5 for name in names}
        adv = objective.advantages(rewards, group_ids)
        assert adv.shape == (n,) and bool(torch.isfinite(adv).all())
        for g in range(self.num_groups):
            assert abs(float(adv[group_ids == g].mean())) < 1e-5

    def test_draw_sigmas_shape_range_and_determinism(self):
        objective = self.make_objective()
        grid = torch.linspace(1, 0, 11)
        first = objective.draw_sigmas(grid, 5, torch.Generator().manual_seed(1))
        again = objective.draw_sigmas(grid, 5, torch.Generator().manual_seed(1))
        assert first.dim() == 2 and first.shape[1] == 5
        assert bool(((first > 0) & (first <= 1)).all())
        assert torch.equal(first, again)

    # -- the loss -------------------------------------------------------------------------------
    def test_on_policy_statistics(self):
        objective = self.make_objective()
        n = 6
        data = self.inputs(n)
        v_new = data["v_old"].clone().requires_grad_(True)
        adv = torch.linspace(-1, 1, n)
        terms, stats = self._loss(objective, v_new, data, adv)
        assert terms.shape == (n,) and terms.requires_grad and bool(torch.isfinite(terms).all())
        assert set(STAT_KEYS) <= set(stats)
        for key in STAT_KEYS:
            assert stats[key].shape == (n,) and not stats[key].requires_grad, key
        assert torch.allclose(stats["ratio"], torch.ones(n))
        assert float(stats["clipped"].abs().sum()) == 0.0
        assert float(stats["approx_kl"].abs().max()) < 1e-12

    def test_learning_moves_velocity_toward_rewarded_targets(self):
        objective = self.make_objective()
        n = 6
        data = self.inputs(n, seed=1)
        adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])
        v_new = data["v_old"].clone().requires_grad_(True)
        terms, _ = self._loss(objective, v_new, data, adv)
        (grad,) = torch.autograd.grad(terms.sum(), v_new)
        toward = ((data["noise"] - data["x0"]) - data["v_old"]).reshape(n, -1)
        # the descent direction −grad, projected on the direction to the target
        push = (-grad.reshape(n, -1) * toward).sum(dim=1)
        assert bool((push[adv > 0] > 0).all()), push
        assert bool((push[adv < 0] < 0).all()), push

    def test_weights_reach_the_advantages(self):
        objective = self.make_objective()
        check_objective_factory(type(objective))
        group_ids = torch.zeros(4, dtype=torch.long)
        rewards = {"a": torch.tensor([0.0, 1.0, 2.0, 3.0]), "b": torch.tensor([3.0, 2.0, 1.0, 0.0])}
        heavy_a = self.with_weights(objective, {"a": 1.0, "b": 0.01}).advantages(rewards, group_ids)
        heavy_b = self.with_weights(objective, {"a": 0.01, "b": 1.0}).advantages(rewards, group_ids)
        assert float(heavy_a[3] - heavy_a[0]) > 0 > float(heavy_b[3] - heavy_b[0])
