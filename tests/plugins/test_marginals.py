"""The samplers reproduce the data distribution on a toy problem whose exact flow is known.

Data ``x0 ~ N(m, diag(s²))``, noise ``ε ~ N(0, I)``, ``x_σ = (1−σ)·x0 + σ·ε``. Per dimension
``x_σ ~ N((1−σ)m, V_σ)`` with ``V_σ = (1−σ)²s² + σ²``, and the exact velocity
``v(x, σ) = E[ε − x0 | x_σ = x]`` is affine in x (Gaussian conditioning):

    E[x0 | x] = m + (1−σ)·s²·(x − (1−σ)m) / V_σ
    E[ε  | x] = σ·(x − (1−σ)m) / V_σ

A sampler started from N(0, I) at σ = 1 must end at N(m, s²). Particles check it statistically;
because every step here is affine in x with Gaussian noise, the exact moments of the discrete
chain can also be pushed through the implementation itself, with no sampling error.

Manually verified (not kept as tests): flipping the sign of the g² correction gives variance
ratios 39-86 (flow) and 1.18-2.1 (dance); doubling it 0.49 (flow) and 0.68-0.90 (dance); dropping
it 4.1-4.8 (flow) and 1.08-1.43 (dance); dropping the (1−σ)·v term moves the means by 0.07-0.38;
doubling the std gives 3.9 (flow) and 1.25-2.1 (dance). All fall outside the tolerances below.
"""

from __future__ import annotations

import math

import pytest
import torch

from mixgrpo.core.sigmas import sigma_grid
from mixgrpo.plugins.samplers.euler import Euler
from mixgrpo.plugins.samplers.sde import sde_step

M = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
S = torch.tensor([0.3, 1.0, 0.6, 1.5], dtype=torch.float64)
NUM_PARTICLES = 40_000
GRID = sigma_grid(200, 1.0)  # fine and unshifted: Euler's error is ~1-2% on the variance here
VAR_TOL = 0.05  # relative; sampling error of a variance at N = 40k is ~0.7%
SDE_FORMS = [("flow", 0.7), ("flow", 0.9), ("dance", 0.3)]


def exact_velocity(x: torch.Tensor, sigma: float, m: torch.Tensor = M, s: torch.Tensor = S) -> torch.Tensor:
    """``E[ε − x0 | x_σ = x]`` for ``x`` ``[N, D]`` (any float dtype; returned in x's dtype)."""
    m, s = m.to(x.dtype), s.to(x.dtype)
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    r = x - (1 - sigma) * m
    e_eps = sigma * r / var
    e_x0 = m + (1 - sigma) * s**2 * r / var
    return e_eps - e_x0


def one_step(x: torch.Tensor, sigmas: torch.Tensor, i: int, form: str | None, a: float, noise: torch.Tensor):
    """One fp32 step: ``form=None`` or the last step (into σ = 0) is an Euler ODE step."""
    v = exact_velocity(x, float(sigmas[i]))
    if form is None or i == sigmas.numel() - 2:
        return Euler().step(x, v, sigmas, i).prev_sample
    return sde_step(x, v, sigmas, i, form=form, noise_level=a, noise=noise).prev_sample


def sample_particles(form: str | None, a: float = 0.0, sigmas: torch.Tensor = GRID, stop: int | None = None,
                     m: torch.Tensor = M, s: torch.Tensor = S) -> torch.Tensor:
    """Walk ``NUM_PARTICLES`` fp32 particles from σ = 1 (to ``sigmas[stop]`` when given): ``[N, D]``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_PARTICLES, M.numel(), generator=gen, dtype=torch.float64)
    x = ((x - x.mean(0)) / x.std(0)).float()  # exact N(0, I) moments: only the steps add error
    for i in range(sigmas.numel() - 1 if stop is None else stop):
        noise = torch.randn(x.shape, generator=gen)
        v = exact_velocity(x, float(sigmas[i]), m, s)
        if form is None or i == sigmas.numel() - 2:
            x = Euler().step(x, v, sigmas, i).prev_sample
        else:
            x = sde_step(x, v, sigmas, i, form=form, noise_level=a, noise=noise).prev_sample
    return x.double()


def chain_moments(form: str | None, a: float = 0.0, sigmas: torch.Tensor = GRID, stop: int | None = None,
                  m: torch.Tensor = M, s: torch.Tensor = S) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-dim mean and variance of the discrete chain, propagated through the implementation.

    Each step maps ``x ↦ A·x + b + std·ξ`` (A, b per dim, v being affine), so
    ``mean' = A·mean + b`` and ``var' = A²·var + std²``. A and b come from stepping two points.
    """
    mean, var = torch.zeros_like(M), torch.ones_like(M)
    for i in range(sigmas.numel() - 1 if stop is None else stop):
        pts = torch.stack([mean, mean + 1.0]).float()
        v = exact_velocity(pts, float(sigmas[i]), m, s)
        if form is None or i == sigmas.numel() - 2:
            res = Euler().step(pts, v, sigmas, i)
        else:
            res = sde_step(pts, v, sigmas, i, form=form, noise_level=a, noise=torch.zeros_like(pts))
        out = res.prev_sample.double()
        slope = out[1] - out[0]
        std = float(res.std)
        mean, var = out[0], slope**2 * var + std**2
    return mean, var


def assert_matches_data(mean: torch.Tensor, var: torch.Tensor, var_tol: float = VAR_TOL) -> None:
    torch.testing.assert_close(mean, M, rtol=0, atol=0.03, msg=lambda m: f"means: {m}")
    ratio = var / S**2
    assert torch.all((ratio - 1).abs() < var_tol), f"variance / s² = {ratio.tolist()}"


def test_exact_velocity_is_the_posterior_mean():
    """Sanity check of the toy: Monte Carlo E[ε − x0 | x ≈ x*] at σ = 0.4 matches the closed form."""
    gen = torch.Generator().manual_seed(1)
    x0 = M + S * torch.randn(400_000, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(400_000, 4, generator=gen, dtype=torch.float64)
    sigma = 0.4
    x = (1 - sigma) * x0 + sigma * eps
    # E[ε − x0 | x] is affine: the least-squares regression of (ε − x0) on x recovers it per dim.
    for d in range(4):
        design = torch.stack([x[:, d], torch.ones_like(x[:, d])], 1)
        coef = torch.linalg.lstsq(design, (eps - x0)[:, d : d + 1]).solution.squeeze(1)
        probe = torch.tensor([[-1.0], [0.5], [2.0]], dtype=torch.float64)
        full = torch.zeros(3, 4, dtype=torch.float64)
        full[:, d] = probe[:, 0]
        exact = exact_velocity(full, sigma)[:, d]
        torch.testing.assert_close(coef[0] * probe[:, 0] + coef[1], exact, rtol=0, atol=0.03)


def test_euler_ode_reaches_data():
    assert_matches_data(*chain_moments(None))
    x = sample_particles(None)
    assert_matches_data(x.mean(0), x.var(0))


@pytest.mark.parametrize(("form", "a"), SDE_FORMS)
def test_sde_reaches_data(form, a):
    """Flow and dance SDEs (last step ODE) preserve the marginals: final N(m, s²)."""
    mean, var = chain_moments(form, a)
    assert_matches_data(mean, var)
    x = sample_particles(form, a)
    assert_matches_data(x.mean(0), x.var(0))
    # the particles follow the exact chain moments up to sampling error
    torch.testing.assert_close(x.var(0) / var, torch.ones_like(var), rtol=0, atol=0.03)


def test_sde_marginals_midway():
    """Halfway (σ = 0.5) the SDE chain has the marginal N((1−σ)m, V_σ) as well.

    The flow form is 1.6-2.2% high here: its first steps are stiff (the σ' substitution makes the
    first per-step std exactly a whatever the step size, so that error does not shrink with finer
    grids); the correction pulls it back to ≤ 1% by σ = 0."""
    stop = 100
    sigma = float(GRID[stop])
    target_var = (1 - sigma) ** 2 * S**2 + sigma**2
    for form, a in SDE_FORMS:
        mean, var = chain_moments(form, a, stop=stop)
        torch.testing.assert_close(mean, (1 - sigma) * M, rtol=0, atol=0.02)
        torch.testing.assert_close(var / target_var, torch.ones_like(var), rtol=0, atol=0.03)


def test_cps_is_exact_on_a_point_mass():
    """CPS preserves the RF coefficients, so for point-mass data (s = 0: x̂0 = x0 and x̂1 = ε exactly)
    every step maps N((1−σ)m, σ²) onto N((1−σ')m, σ'²) exactly, at any step size."""
    point = torch.zeros_like(S)
    coarse = sigma_grid(10, 3.0)
    for grid, stop in ((coarse, 6), (GRID, 150)):
        sigma = float(grid[stop])
        mean, var = chain_moments("cps", 0.8, sigmas=grid, stop=stop, s=point)
        torch.testing.assert_close(mean, (1 - sigma) * M, rtol=0, atol=1e-5)
        torch.testing.assert_close(var, torch.full_like(var, sigma**2), rtol=1e-4, atol=0)


def test_cps_mean_is_exact_but_variance_contracts_on_fine_grids():
    """CPS is not marginal-preserving for spread-out data: every step redraws the fixed fraction
    sin²(aπ/2) of the noise part whatever the step size, and replacing x0 by its posterior mean
    then loses variance each step. Per step (per dim, A = (1−σ)²s², B = σ², c = cos(aπ/2)) the
    variance leaves V = A + B as ``V − A·B·(1−c)²/V``. The mean stays exact (E[x̂0] = m,
    E[x̂1] = 0). This is the method as specified (docs/algorithms.md §3), not a bug of the step: the
    data variance ends at 0.63-0.64·s² on 200 steps and 0.31-0.50·s² on the 10-step shift-3 grid."""
    mean, var = chain_moments("cps", 0.8)
    ref_mean, ref_var = cps_moments_float64(GRID, 0.8)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean, M, rtol=0, atol=1e-5)
    ratio = var / S**2
    assert torch.all((ratio > 0.62) & (ratio < 0.65)), ratio.tolist()
    x = sample_particles("cps", 0.8)
    torch.testing.assert_close(x.mean(0), M, rtol=0, atol=0.03)
    torch.testing.assert_close(x.var(0) / var, torch.ones_like(var), rtol=0, atol=0.03)
    coarse = sigma_grid(10, 3.0)
    coarse_var = chain_moments("cps", 0.8, sigmas=coarse)[1]
    torch.testing.assert_close(coarse_var, cps_moments_float64(coarse, 0.8)[1], rtol=1e-4, atol=0)
    assert torch.all((coarse_var / S**2 > 0.3) & (coarse_var / S**2 < 0.5)), (coarse_var / S**2).tolist()


def cps_moments_float64(sigmas: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact moments of the CPS chain (last step Euler) in float64, independently of the implementation:
    with v = α·x + β affine, x' = (1−σ')·(x − σv) + k·(x + (1−σ)v) + std·ξ, k = sqrt(σ'² − std²)."""
    mean, var = torch.zeros_like(M), torch.ones_like(M)
    s = [float(t) for t in sigmas.double()]
    for i in range(len(s) - 1):
        sig, nxt = s[i], s[i + 1]
        big_v = (1 - sig) ** 2 * S**2 + sig**2
        alpha = (sig - (1 - sig) * S**2) / big_v  # v = α·(x − (1−σ)m) − m
        beta = -alpha * (1 - sig) * M - M
        if i == len(s) - 2:  # Euler into σ = 0
            slope, icpt, std = 1 + (nxt - sig) * alpha, (nxt - sig) * beta, 0.0
        else:
            std = nxt * math.sin(a * math.pi / 2)
            k = math.sqrt(nxt**2 - std**2)
            slope = (1 - nxt) * (1 - sig * alpha) + k * (1 + (1 - sig) * alpha)
            icpt = (1 - nxt) * (-sig * beta) + k * (1 - sig) * beta
        mean, var = slope * mean + icpt, slope**2 * var + std**2
    return mean, var
