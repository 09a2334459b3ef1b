"""``SamplerContract``: the tests every ``Sampler`` plugin must pass.

Subclass it in a test module, name the subclass ``Test…`` and override ``make_sampler``::

    class TestMySampler(SamplerContract):
        def make_sampler(self):
            return MySampler(noise_level=0.5)

Only properties that hold for any correct sampler are checked, for both ODE solvers
(``stochastic = False``) and SDE samplers (``stochastic = True``):

- shapes and dtypes (fp32 outputs, whatever the input precision), ``x0 = x − σ·v``;
- determinism given the inputs, batch independence (a row's result does not depend on the other
  rows of the batch, so log-probs recomputed on other micro-batches agree);
- the sampler never modifies the ``SolverHistory`` (the rollout appends to it);
- an out-of-range step index raises;
- ODE solvers: ``log_prob is None``, ``std == 0``, ``mean == prev_sample``, and exactness on a
  straight-line flow (``x = (1−σ)·x0 + σ·ε`` with the exact ``v = ε − x0`` lands on
  ``(1−σ_{i+1})·x0 + σ_{i+1}·ε``, with or without a consistent history);
- the grid's last step, into σ = 0, does what ``supports_final_step`` declares: a finite step (and,
  for SDE samplers, a finite log-prob with std > 0) when True; a ``ValueError`` when False (never a
  silent NaN or infinite log-prob), which only an SDE sampler may declare;
- SDE samplers: ``log_prob`` ``[B]`` finite; ``noise = 0`` gives the mean; the draw is
  ``mean + std·ξ``; evaluating a drawn ``prev_sample`` reproduces its log-prob bit-for-bit (the
  on-policy check, docs/algorithms.md §3); the log-prob's gradient flows through ``v`` and not
  through ``prev_sample``.

Override ``grid``, ``shape`` or ``step_indices`` to adapt the problem (e.g. an SDE sampler that is
only defined on some steps).
"""

from __future__ import annotations

import pytest
import torch

from mixgrpo.core.interfaces import Sampler
from mixgrpo.core.types import SolverHistory, StepResult


def _static_grid(num_steps: int, shift: float) -> torch.Tensor:
    """A shifted σ grid ``[num_steps + 1]`` fp32 from 1 to 0 (computed here to keep the contract standalone)."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * u / (1.0 + (shift - 1.0) * u)).float()


class SamplerContract:
    """Generic tests for a ``Sampler``. Subclasses override ``make_sampler``."""

    #: the per-sample latent shape of the test problem
    shape: tuple[int, ...] = (4, 3, 5)
    #: batch size of the test problem
    batch_size: int = 3

    def make_sampler(self) -> Sampler:
        """Return the sampler under test (override in the subclass)."""
        raise NotImplementedError(f"{type(self).__name__} must override make_sampler()")

    # -- the problem ---------------------------------------------------------------------------
    def grid(self) -> torch.Tensor:
        """The σ grid the tests walk: fp32 ``[T + 1]`` from 1 to 0 (10 steps, shift 3)."""
        return _static_grid(10, 3.0)

    def step_indices(self, sampler: Sampler, sigmas: torch.Tensor) -> list[int]:
        """Steps to test: all of them, but the last (into σ = 0) only for a sampler that declares
        ``supports_final_step`` (a step into σ = 0 may have std 0, where no log-prob exists, e.g. CPS)."""
        num_steps = sigmas.numel() - 1
        return list(range(num_steps if sampler.supports_final_step else num_steps - 1))

    def inputs(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Random ``(x, v)`` ``[B, *shape]``, reproducible from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch_size, *self.shape, generator=gen)
        v = torch.randn(self.batch_size, *self.shape, generator=gen)
        return x.to(dtype), v.to(dtype)

    def noise(self, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch_size, *self.shape, generator=gen)

    def _only(self, stochastic: bool) -> tuple[Sampler, torch.Tensor]:
        """``(sampler, grid)`` for a test of SDE samplers (``stochastic=True``) or of ODE solvers,
        skipping it for a sampler of the other kind."""
        sampler = self.make_sampler()
        if sampler.stochastic != stochastic:
            pytest.skip("ODE solver" if stochastic else "SDE sampler")
        return sampler, self.grid()

    def _step(self, sampler: Sampler, x, v, sigmas, index, **kwargs) -> StepResult:
        if sampler.stochastic and "noise" not in kwargs and "prev_sample" not in kwargs:
            kwargs["noise"] = self.noise(100 + index)
        return sampler.step(x, v, sigmas, index, **kwargs)

    # -- every sampler -------------------------------------------------------------------------
    def test_is_sampler(self):
        sampler = self.make_sampler()
        assert isinstance(sampler, Sampler)
        assert isinstance(sampler.stochastic, bool)

    def test_shapes_and_dtypes(self):
        sampler, sigmas = self.make_sampler(), self.grid()
        x, v = self.inputs()
        full = (self.batch_size, *self.shape)
        for i in self.step_indices(sampler, sigmas):
            res = self._step(sampler, x, v, sigmas, i)
            assert isinstance(res, StepResult)
            assert res.prev_sample.shape == full and res.prev_sample.dtype == torch.float32
            assert res.mean.shape == full and res.mean.dtype == torch.float32
            std = torch.as_tensor(res.std)
            assert torch.broadcast_shapes(std.shape, full) == full, "std must broadcast to x"
            if isinstance(res.std, torch.Tensor):
                assert res.std.dtype == torch.float32
            assert torch.isfinite(res.prev_sample).all() and torch.isfinite(res.mean).all()

    def test_low_precision_inputs_give_fp32(self):
        sampler, sigmas = self.make_sampler(), self.grid()
        x, v = self.inputs(dtype=torch.bfloat16)
        res = self._step(sampler, x, v, sigmas, 1)
        assert res.prev_sample.dtype == torch.float32 and res.mean.dtype == torch.float32
        if res.log_prob is not None:
            assert res.log_prob.dtype == torch.float32
        if res.x0 is not None:
            assert res.x0.dtype == torch.float32

    def test_x0_is_the_data_estimate(self):
        sampler, sigmas = self.make_sampler(), self.grid()
        x, v = self.inputs()
        for i in self.step_indices(sampler, sigmas):
            res = self._step(sampler, x, v, sigmas, i)
            if res.x0 is not None:
                torch.testing.assert_close(res.x0, x - float(sigmas[i]) * v, rtol=1e-6, atol=1e-6)

    def test_deterministic_given_inputs(self):
        sampler, sigmas = self.make_sampler(), self.grid()
        x, v = self.inputs()
        for i in self.step_indices(sampler, sigmas):
            a = self._step(sampler, x, v, sigmas, i)
            b = self._step(sampler, x.clone(), v.clone(), sigmas, i)
            assert torch.equal(a.prev_sample, b.prev_sample)
            assert torch.equal(a.mean, b.mean)
            if a.log_prob is not None:
                assert torch.equal(a.log_prob, b.log_prob)

    def test_batch_independent(self):
        sampler, sigmas = self.make_sampler(), self.grid()
        x, v = self.inputs()
        noise = self.noise()
        kwargs = {"noise": noise} if sampler.stochastic else {}
        full = sampler.step(x, v, sigmas, 2, **kwargs)
        rows = [2, 0]
        kwargs = {"noise": noise[rows]} if sampler.stochastic else {}
        part = sampler.step(x[rows], v[rows], sigmas, 2, **kwargs)
        torch.testing.assert_close(part.prev_sample, full.prev_sample[rows], rtol=1e-6, atol=1e-6)
        if full.log_prob is not None:
            torch.testing.assert_close(part.log_prob, full.log_prob[rows], rtol=1e-6, atol=1e-6)

    def test_does_not_modify_history(self):
        sampler, sigmas = self.make_sampler(), self.grid()
        x, v = self.inputs()
        history = SolverHistory()
        history.append(float(sigmas[1]), x - float(sigmas[1]) * v)
        before = [(s, t.clone()) for s, t in history.entries]
        self._step(sampler, x, v, sigmas, 2, history=history)
        assert len(history.entries) == len(before)
        for (s0, t0), (s1, t1) in zip(before, history.entries, strict=True):
            assert s0 == s1 and torch.equal(t0, t1)

    def test_final_step_is_as_declared(self):
        """``supports_final_step`` is what the trainer trusts to refuse, before any model loads, a
        schedule that samples the last step with an SDE that cannot take it."""
        sampler, sigmas = self.make_sampler(), self.grid()
        assert isinstance(sampler.supports_final_step, bool)
        assert sampler.supports_final_step or sampler.stochastic, "an ODE solver must take the last step"
        x, v = self.inputs()
        last = sigmas.numel() - 2
        if not sampler.supports_final_step:
            with pytest.raises(ValueError):
                self._step(sampler, x, v, sigmas, last)
            return
        res = self._step(sampler, x, v, sigmas, last)
        assert torch.isfinite(res.prev_sample).all()
        if sampler.stochastic:
            assert res.log_prob is not None and torch.isfinite(res.log_prob).all()
            assert float(torch.as_tensor(res.std).min()) > 0.0

    def test_index_out_of_range_raises(self):
        sampler, sigmas = self.make_sampler(), self.grid()
        x, v = self.inputs()
        with pytest.raises((IndexError, ValueError)):
            self._step(sampler, x, v, sigmas, sigmas.numel() - 1)

    # -- ODE solvers ---------------------------------------------------------------------------
    def test_ode_has_no_log_prob(self):
        sampler, sigmas = self._only(stochastic=False)
        x, v = self.inputs()
        for i in self.step_indices(sampler, sigmas):
            res = sampler.step(x, v, sigmas, i)
            assert res.log_prob is None
            assert float(torch.as_tensor(res.std).abs().max()) == 0.0
            assert torch.equal(res.mean, res.prev_sample)

    def test_ode_exact_on_straight_flow(self):
        """On ``x = (1−σ)·x0 + σ·ε`` with ``v = ε − x0`` the trajectory is a straight line in σ and
        the data estimate is constant, so an RF ODE solver lands exactly on ``(1−σ')·x0 + σ'·ε``,
        with or without a (consistent) history."""
        sampler, sigmas = self._only(stochastic=False)
        x0, eps = self.inputs(seed=3)
        v = eps - x0
        for i in self.step_indices(sampler, sigmas):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            x = (1.0 - sigma) * x0 + sigma * eps
            target = (1.0 - sigma_next) * x0 + sigma_next * eps
            histories = [None, SolverHistory()]
            if i > 0:
                consistent = SolverHistory()
                consistent.append(float(sigmas[i - 1]), x0.clone())
                histories.append(consistent)
            for history in histories:
                res = sampler.step(x, v, sigmas, i, history=history)
                torch.testing.assert_close(res.prev_sample, target, rtol=0, atol=2e-5)

    # -- SDE samplers --------------------------------------------------------------------------
    def test_sde_log_prob_shape_and_finite(self):
        sampler, sigmas = self._only(stochastic=True)
        x, v = self.inputs()
        for i in self.step_indices(sampler, sigmas):
            res = self._step(sampler, x, v, sigmas, i)
            assert res.log_prob is not None
            assert res.log_prob.shape == (self.batch_size,) and res.log_prob.dtype == torch.float32
            assert torch.isfinite(res.log_prob).all()
            assert float(torch.as_tensor(res.std).min()) > 0.0

    def test_sde_draw_is_mean_plus_std_noise(self):
        sampler, sigmas = self._only(stochastic=True)
        x, v = self.inputs()
        noise = self.noise()
        for i in self.step_indices(sampler, sigmas):
            zero = sampler.step(x, v, sigmas, i, noise=torch.zeros_like(noise))
            assert torch.equal(zero.prev_sample, zero.mean)
            res = sampler.step(x, v, sigmas, i, noise=noise)
            torch.testing.assert_close(res.mean, zero.mean, rtol=0, atol=0)
            torch.testing.assert_close(res.prev_sample - res.mean, res.std * noise, rtol=1e-4, atol=1e-5)

    def test_sde_log_prob_reproduces_bit_for_bit(self):
        """The on-policy check: recomputing the log-prob of a drawn sample gives the same bits."""
        sampler, sigmas = self._only(stochastic=True)
        x, v = self.inputs()
        for i in self.step_indices(sampler, sigmas):
            drawn = self._step(sampler, x, v, sigmas, i)
            again = sampler.step(x, v, sigmas, i, prev_sample=drawn.prev_sample.clone())
            assert torch.equal(again.log_prob, drawn.log_prob)
            assert torch.equal(again.prev_sample, drawn.prev_sample)

    def test_sde_log_prob_gradient_flows_through_v_only(self):
        sampler, sigmas = self._only(stochastic=True)
        x, v = self.inputs()
        drawn = self._step(sampler, x, v, sigmas, 3)
        v = v.clone().requires_grad_(True)
        sample = drawn.prev_sample.clone().requires_grad_(True)
        res = sampler.step(x, v, sigmas, 3, prev_sample=sample)
        res.log_prob.sum().backward()
        assert v.grad is not None and float(v.grad.abs().sum()) > 0.0
        assert sample.grad is None or float(sample.grad.abs().sum()) == 0.0
