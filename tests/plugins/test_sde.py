"""The SDE step (plugins/samplers/sde.py) against an independent float64 re-derivation of docs/algorithms.md §3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.sigmas import sigma_grid
from mixgrpo.plugins.samplers.sde import CPSSDE, DanceSDE, FlowSDE, GridStep, ReverseSDE, SDESampler, sde_step
from mixgrpo.testing import SamplerContract

SHAPE = (4, 2, 3, 5)  # [B, C, H, W]
GRID = sigma_grid(25, 3.0)  # the MixGRPO grid, fp32
INDICES = [0, 1, 2, 7, 12, 20, 23]  # index 0 is σ = 1; 23 is the last step with σ_{i+1} > 0


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen)
    v = torch.randn(SHAPE, generator=gen)
    xi = torch.randn(SHAPE, generator=gen)
    return x, v, xi


def reference_step(x, v, sigmas, i, form, a):
    """docs/algorithms.md §3 written out again in float64: returns (mean, std) as float64 tensors."""
    x, v = x.double(), v.double()
    s = [float(t) for t in sigmas.double()]
    sig, nxt = s[i], s[i + 1]
    dt = nxt - sig
    if form == "cps":
        std = nxt * math.sin(a * math.pi / 2)
        x0_hat = x - sig * v
        x1_hat = x + (1 - sig) * v
        return (1 - nxt) * x0_hat + math.sqrt(nxt**2 - std**2) * x1_hat, torch.tensor(std, dtype=torch.float64)
    if form == "flow":
        sig_p = s[1] if sig == 1.0 else sig
        g = a * math.sqrt(sig / (1 - sig_p))
    else:
        g = a
    mean = x + dt * (v + g**2 / (2 * sig) * (x + (1 - sig) * v))
    return mean, torch.tensor(g * math.sqrt(-dt), dtype=torch.float64)


FORMS = [("flow", 0.7), ("flow", 0.9), ("dance", 0.3), ("cps", 0.8)]


@pytest.mark.parametrize(("form", "a"), FORMS)
@pytest.mark.parametrize("index", INDICES)
def test_step_matches_float64_reference(form, a, index):
    x, v, xi = _inputs(index)
    res = sde_step(x, v, GRID, index, form=form, noise_level=a, noise=xi)
    mean, std = reference_step(x, v, GRID, index, form, a)
    torch.testing.assert_close(res.mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert float(res.std) == pytest.approx(float(std), rel=1e-6)
    torch.testing.assert_close(res.prev_sample.double(), mean + std * xi.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.x0.double(), x.double() - float(GRID[index]) * v.double(), rtol=1e-6, atol=1e-6)
    for t in (res.prev_sample, res.mean, res.std, res.log_prob, res.x0):
        assert t.dtype == torch.float32


@pytest.mark.parametrize(("form", "a"), FORMS)
@pytest.mark.parametrize("index", [0, 5, 23])
def test_log_prob_is_the_gaussian_density(form, a, index):
    x, v, xi = _inputs(10 + index)
    res = sde_step(x, v, GRID, index, form=form, noise_level=a, noise=xi)
    mean, std = reference_step(x, v, GRID, index, form, a)
    density = torch.distributions.Normal(mean, std).log_prob(res.prev_sample.double())
    expected = density.reshape(SHAPE[0], -1).mean(1)
    assert res.log_prob.shape == (SHAPE[0],)
    torch.testing.assert_close(res.log_prob.double(), expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize(("form", "a"), FORMS)
def test_log_prob_of_given_sample_and_gradient(form, a):
    """Given prev_sample: its log-prob, with d/dv equal to the float64 reference and none to prev_sample."""
    x, v, xi = _inputs(3)
    drawn = sde_step(x, v, GRID, 4, form=form, noise_level=a, noise=xi)
    v32 = v.clone().requires_grad_(True)
    sample = drawn.prev_sample.clone().requires_grad_(True)
    res = sde_step(x, v32, GRID, 4, form=form, noise_level=a, prev_sample=sample)
    assert torch.equal(res.log_prob.detach(), drawn.log_prob)  # the on-policy check: bit-for-bit
    res.log_prob.sum().backward()
    assert sample.grad is None  # computed against prev_sample.detach()

    v64 = v.double().requires_grad_(True)
    mean, std = reference_step(x, v64, GRID, 4, form, a)
    ref = torch.distributions.Normal(mean, std).log_prob(drawn.prev_sample.double()).reshape(SHAPE[0], -1).mean(1)
    ref.sum().backward()
    torch.testing.assert_close(v32.grad.double(), v64.grad, rtol=1e-3, atol=1e-5)
    assert float(v64.grad.abs().max()) > 0


@pytest.mark.parametrize(("form", "a"), FORMS)
def test_sum_reduction_is_mean_times_elements(form, a):
    x, v, xi = _inputs(4)
    mean_lp = sde_step(x, v, GRID, 6, form=form, noise_level=a, noise=xi).log_prob
    sum_lp = sde_step(x, v, GRID, 6, form=form, noise_level=a, noise=xi, reduction="sum").log_prob
    elements = math.prod(SHAPE[1:])
    torch.testing.assert_close(sum_lp, mean_lp * elements, rtol=1e-5, atol=1e-3)


def test_flow_first_step_std_is_exactly_a():
    """At σ = 1 the σ' = σ_1 substitution gives g = a/sqrt(1−σ_1) and Δ = 1 − σ_1, so g·√Δ = a."""
    x, v, xi = _inputs()
    for a in (0.7, 0.9):
        for grid in (GRID, sigma_grid(10, 3.0), sigma_grid(16, 1.0)):
            res = sde_step(x, v, grid, 0, form="flow", noise_level=a, noise=xi)
            assert float(res.std) == pytest.approx(a, abs=1e-6)


def test_flow_per_step_std_on_mixgrpo_grid():
    """docs/algorithms.md §3 lists the per-step std g·√Δ (not g: g_0 = a·sqrt(1/(1−σ_1)) ≈ 5.98).

    To 4 decimals the values are 0.7000, 0.7145, 0.5087, 0.4182, 0.3646, …, 0.1107, 0.0825; the
    document's "0.083" is 0.08250 rounded up (strictly it rounds to 0.082), hence the 5.1e-4 bound.
    """
    x, v, xi = _inputs()
    stds = [float(sde_step(x, v, GRID, i, form="flow", noise_level=0.7, noise=xi).std) for i in range(25)]
    listed_head, listed_tail = [0.700, 0.715, 0.509, 0.418, 0.365], [0.111, 0.083]
    np.testing.assert_allclose(stds[:5], listed_head, atol=5.1e-4, rtol=0)
    np.testing.assert_allclose(stds[-2:], listed_tail, atol=5.1e-4, rtol=0)
    np.testing.assert_allclose(stds[:5], [0.7000, 0.7145, 0.5087, 0.4182, 0.3646], atol=6e-5, rtol=0)
    np.testing.assert_allclose(stds[-2:], [0.1107, 0.0825], atol=6e-5, rtol=0)
    assert all(a > b for a, b in zip(stds[1:], stds[2:], strict=False))  # decreasing after step 1
    g0 = 0.7 * math.sqrt(1.0 / (1.0 - float(GRID[1])))
    assert g0 == pytest.approx(5.98, abs=0.01)  # g itself is far from the listed 0.700


def test_dance_std_is_eta_sqrt_delta():
    x, v, xi = _inputs()
    grid = sigma_grid(16, 3.0)
    stds = []
    for i in range(16):
        res = sde_step(x, v, grid, i, form="dance", noise_level=0.3, noise=xi)
        delta = float(grid[i]) - float(grid[i + 1])
        assert float(res.std) == pytest.approx(0.3 * math.sqrt(delta), rel=1e-6)
        stds.append(float(res.std))
    # docs/algorithms.md §3: DanceGRPO (T = 16, η = 0.3) goes from 0.044 up to 0.12
    assert stds[0] == pytest.approx(0.044, abs=5e-4) and stds[-1] == pytest.approx(0.12, abs=5e-3)
    assert all(b > a for a, b in zip(stds, stds[1:], strict=False))


def test_cps_std_and_mean_coefficients():
    """CPS keeps the RF coefficients: mean² coefficient of x̂1 plus std² equals σ_{i+1}²."""
    x0, eps, _ = _inputs(7)
    for i in (0, 3, 15, 23):
        sig, nxt = float(GRID[i]), float(GRID[i + 1])
        x = (1 - sig) * x0 + sig * eps
        res = sde_step(x, eps - x0, GRID, i, form="cps", noise_level=0.8, noise=torch.zeros_like(x))
        std = nxt * math.sin(0.8 * math.pi / 2)
        assert float(res.std) == pytest.approx(std, rel=1e-6)
        expected = (1 - nxt) * x0 + math.sqrt(nxt**2 - std**2) * eps
        torch.testing.assert_close(res.mean, expected, rtol=1e-5, atol=1e-5)


def test_draw_uses_generator_reproducibly():
    x, v, _ = _inputs()
    a = sde_step(x, v, GRID, 3, form="flow", noise_level=0.7, generator=torch.Generator().manual_seed(5))
    b = sde_step(x, v, GRID, 3, form="flow", noise_level=0.7, generator=torch.Generator().manual_seed(5))
    c = sde_step(x, v, GRID, 3, form="flow", noise_level=0.7, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert not torch.equal(a.prev_sample, c.prev_sample)
    xi = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.prev_sample, a.mean + a.std * xi, rtol=1e-6, atol=1e-6)


def test_inputs_are_cast_to_fp32():
    x, v, xi = _inputs()
    res = sde_step(x.bfloat16(), v.double(), GRID, 2, form="dance", noise_level=0.3, noise=xi.half())
    ref = sde_step(x.bfloat16().float(), v, GRID, 2, form="dance", noise_level=0.3, noise=xi.half().float())
    assert res.prev_sample.dtype == torch.float32 and res.log_prob.dtype == torch.float32
    torch.testing.assert_close(res.prev_sample, ref.prev_sample)


@pytest.mark.parametrize(("cls", "form", "default"), [(FlowSDE, "flow", 0.7), (DanceSDE, "dance", 0.3),
                                                      (CPSSDE, "cps", 0.8)])
def test_sampler_classes_wrap_sde_step(cls, form, default):
    sampler = cls()
    assert sampler.stochastic and sampler.noise_level == default and sampler.reduction == "mean"
    x, v, xi = _inputs(8)
    got = sampler.step(x, v, GRID, 9, noise=xi)
    want = sde_step(x, v, GRID, 9, form=form, noise_level=default, noise=xi)
    assert torch.equal(got.prev_sample, want.prev_sample) and torch.equal(got.log_prob, want.log_prob)
    summed = cls(noise_level=0.5, reduction="sum").step(x, v, GRID, 9, prev_sample=got.prev_sample)
    want = sde_step(x, v, GRID, 9, form=form, noise_level=0.5, prev_sample=got.prev_sample, reduction="sum")
    assert torch.equal(summed.log_prob, want.log_prob)


def test_registered_through_entry_points():
    pm = PluginManager(load_entry_points=True)
    flow = pm.create("sampler", "sde.flow")
    assert isinstance(flow, FlowSDE) and flow.noise_level == 0.7
    dance, cps = pm.create("sampler", "sde.dance"), pm.create("sampler", "sde.cps")
    assert isinstance(dance, DanceSDE) and dance.noise_level == 0.3
    assert isinstance(cps, CPSSDE) and cps.noise_level == 0.8
    assert pm.create("sampler", "sde.flow", noise_level=0.9).noise_level == 0.9


# -- errors -------------------------------------------------------------------------------------
def test_unknown_form_lists_valid_ones():
    x, v, _ = _inputs()
    with pytest.raises(ValueError, match="flow, dance, cps"):
        sde_step(x, v, GRID, 0, form="ode", noise_level=0.7)


@pytest.mark.parametrize("index", [-1, 25, 26])
def test_index_out_of_range(index):
    x, v, _ = _inputs()
    with pytest.raises(ValueError, match="out of range"):
        sde_step(x, v, GRID, index, form="flow", noise_level=0.7)


@pytest.mark.parametrize("level", [0.0, -0.3, float("nan")])
def test_noise_level_must_be_positive(level):
    x, v, _ = _inputs()
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        sde_step(x, v, GRID, 0, form="dance", noise_level=level)
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        FlowSDE(noise_level=level)


def test_zero_std_step_raises():
    x, v, _ = _inputs()
    with pytest.raises(ValueError, match="undefined at std 0.*ODE step"):
        sde_step(x, v, GRID, 24, form="cps", noise_level=0.8)
    with pytest.raises(ValueError, match="std 0"):  # a degenerate grid with a zero-length step
        sde_step(x, v, torch.tensor([1.0, 0.5, 0.5, 0.0]), 1, form="dance", noise_level=0.3)
    # flow and dance are defined on the last step (σ_{i+1} = 0): g·√Δ > 0 there
    assert float(sde_step(x, v, GRID, 24, form="flow", noise_level=0.7).std) > 0


def test_bad_reduction_and_shapes():
    x, v, xi = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        sde_step(x, v, GRID, 0, form="flow", noise_level=0.7, reduction="max")
    with pytest.raises(ValueError, match="reduction"):
        DanceSDE(reduction="none")
    with pytest.raises(ValueError, match="noise has shape"):
        sde_step(x, v, GRID, 0, form="flow", noise_level=0.7, noise=xi[:2])
    with pytest.raises(ValueError, match="prev_sample has shape"):
        sde_step(x, v, GRID, 0, form="flow", noise_level=0.7, prev_sample=xi[:, :1])


# -- a new noise form on the base classes ------------------------------------------------------------
class LinearSDE(ReverseSDE):
    """A form of the Euler–Maruyama family is its diffusion coefficient: here ``g = a·σ``."""

    def __init__(self, noise_level: float = 0.5, reduction: str = "mean") -> None:
        super().__init__(noise_level, reduction)

    def diffusion(self, step: GridStep) -> float:
        return self.noise_level * step.sigma


class TestLinearSDEContract(SamplerContract):
    def make_sampler(self):
        return LinearSDE()


def test_a_new_form_is_its_diffusion_coefficient():
    x, v, xi = _inputs(11)
    for i in (0, 5, 24):
        res = LinearSDE(0.5).step(x, v, GRID, i, noise=xi)
        sig, nxt = float(GRID[i]), float(GRID[i + 1])
        g = 0.5 * sig
        mean = x.double() + (nxt - sig) * (v.double() + g**2 / (2 * sig) * (x.double() + (1 - sig) * v.double()))
        torch.testing.assert_close(res.mean.double(), mean, rtol=1e-5, atol=1e-5)
        assert float(res.std) == pytest.approx(g * math.sqrt(sig - nxt), rel=1e-6)
    assert isinstance(LinearSDE(), SDESampler)
    assert repr(LinearSDE(0.2)) == "LinearSDE(noise_level=0.2, reduction='mean')"
    with pytest.raises(TypeError, match="abstract"):
        SDESampler(0.5)  # a form defines std and mean
