"""σ grids (core/sigmas.py) against docs/algorithms.md §2/§6, a float64 formula, and diffusers' schedulers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mixgrpo.core.sigmas import (
    compressed_grid,
    flux_mu,
    num_post_window_points,
    rollout_nfe,
    shift_time,
    sigma_grid,
)

T, SHIFT, W = 25, 3.0, 4  # MixGRPO: 25 steps, shift 3, window of 4


def float64_static(num_steps: int, shift: float) -> np.ndarray:
    """``σ_k = s·u_k / (1 + (s−1)·u_k)``, ``u_k = 1 − k/T`` (docs/algorithms.md §2), in float64."""
    u = 1.0 - np.arange(num_steps + 1) / num_steps
    return shift * u / (1.0 + (shift - 1.0) * u)


# -- static / diffusers / dynamic grids --------------------------------------------------------
def test_static_grid_matches_the_document_and_formula():
    grid = sigma_grid(T, SHIFT)
    assert grid.dtype == torch.float32 and grid.shape == (T + 1,)
    listed_head, listed_tail = [1.0, 0.9863, 0.9718], [0.2069, 0.1111, 0.0]
    np.testing.assert_allclose(grid[:3].numpy(), listed_head, atol=5e-5)
    np.testing.assert_allclose(grid[-3:].numpy(), listed_tail, atol=5e-5)
    np.testing.assert_allclose(grid.double().numpy(), float64_static(T, SHIFT), rtol=1e-7, atol=1e-7)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert torch.all(grid[1:] < grid[:-1])


@pytest.mark.parametrize(("num_steps", "shift"), [(1, 3.0), (10, 1.0), (16, 3.0), (40, 2.5)])
def test_static_grid_other_sizes(num_steps, shift):
    grid = sigma_grid(num_steps, shift)
    np.testing.assert_allclose(grid.double().numpy(), float64_static(num_steps, shift), rtol=1e-7, atol=1e-7)
    if shift == 1.0:  # no shift: uniform steps
        np.testing.assert_allclose(np.diff(grid.double().numpy()), -1.0 / num_steps, atol=1e-7)


def test_diffusers_kind_matches_flow_match_euler_scheduler():
    """FlowGRPO's SD3.5 10-step grid: diffusers shifts σ_min twice, so it ends …, .278, .0089, 0."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    ours = sigma_grid(10, 3.0, kind="diffusers")
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=1e-6)
    listed = [1, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.0089, 0]
    np.testing.assert_allclose(ours.numpy(), listed, atol=5e-4)
    for steps in (4, 25, 40):
        sched.set_timesteps(steps)
        torch.testing.assert_close(sigma_grid(steps, 3.0, kind="diffusers"), sched.sigmas.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("num_steps", "seq_len"), [(28, 4096), (25, 2025), (50, 1024), (10, 256)])
def test_dynamic_kind_matches_flux_scheduler(num_steps, seq_len):
    """The FLUX pipeline passes ``sigmas = linspace(1, 1/T, T)`` and ``mu`` to
    ``set_timesteps``; the scheduler then applies ``e^mu / (e^mu + (1/σ − 1))`` and appends 0.

    (Calling ``set_timesteps(T, mu=mu)`` without sigmas instead spaces σ from 1 to 1/1000, a
    different grid: the FLUX pipeline never does that.)
    """
    mu = flux_mu(seq_len)
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    ours = sigma_grid(num_steps, kind="dynamic", mu=mu)
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("num_steps", "mu"), [(10, 0.53871), (50, 0.8343), (4, 0.5)])
def test_shift_terminal_matches_the_qwen_image_scheduler(num_steps, mu):
    """Qwen-Image's scheduler (dynamic shift, exponential, shift_terminal 0.02), called as its pipeline
    calls it: ``sigmas = linspace(1, 1/T, T)`` and ``mu``; the stretched grid ends at 0.02, then 0."""
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    ours = sigma_grid(num_steps, kind="dynamic", mu=mu, shift_terminal=0.02)
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=1e-6)
    assert float(ours[-2]) == pytest.approx(0.02, abs=1e-7) and float(ours[-1]) == 0.0
    with pytest.raises(ValueError, match="shift_terminal must be in"):
        sigma_grid(num_steps, kind="dynamic", mu=mu, shift_terminal=1.5)


def test_flux_mu_is_linear_in_token_count():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)  # 1024² image: 64×64 tokens after 2×2 patching
    assert flux_mu((256 + 4096) // 2) == pytest.approx((0.5 + 1.15) / 2)


def test_grid_errors():
    with pytest.raises(ValueError, match="num_steps"):
        sigma_grid(0)
    with pytest.raises(ValueError, match="shift"):
        sigma_grid(10, 0.0)
    with pytest.raises(ValueError, match="static, dynamic, diffusers"):
        sigma_grid(10, kind="karras")
    with pytest.raises(ValueError, match="mu"):
        sigma_grid(10, kind="dynamic")


# -- the MixGRPO-Flash compressed grid (docs/algorithms.md §6) ------------------------------------
def flash_nfe_formula(start: int, size: int, ratio: float, num_steps: int = T) -> int:
    """NFE = l + w + (n_post − 1), n_post = max(int((T − L)·r), 2), L = l + w − 1."""
    last = start + size - 1
    n_post = max(int((num_steps - last) * ratio), 2)
    return start + size + (n_post - 1)


@pytest.mark.parametrize("start", range(12))
def test_compressed_grid_structure(start):
    full = sigma_grid(T, SHIFT)
    grid = compressed_grid(T, SHIFT, (start, W), 0.4)
    last = start + W - 1
    # the window and everything before it is untouched (training recomputes log-probs there)
    assert torch.equal(grid[: last + 2], full[: last + 2])
    assert grid[-1].item() == 0.0 and grid.dtype == torch.float32
    assert torch.all(grid[1:] < grid[:-1])
    # the post-window part is a linspace in unshifted time, then shifted
    n_post = num_post_window_points(T, last, 0.4)
    post = shift_time(np.linspace(1.0 - (last + 1) / T, 0.0, n_post), SHIFT)
    np.testing.assert_allclose(grid[last + 1 :].double().numpy(), post, rtol=1e-6, atol=1e-7)
    assert rollout_nfe(grid) == flash_nfe_formula(start, W, 0.4) < T


def test_flash_nfe_per_window_and_mean():
    """Flash (progressive window, w = 4, r = 0.4, T = 25): NFE for l = 0..11 is
    11, 12, 13, 13, 14, 14, 15, 16, 16, 17, 17, 18.

    Mean over the 12 windows: 176/12 = 14.67. Over the training schedule (τ = 20 iterations per
    window, 300 iterations, l = min(k // 20, 11): l = 0..10 for 20 iterations each, l = 11 for the
    last 80): (20·158 + 80·18)/300 = 4600/300 = 15.33. The paper reports ~16: it counts one more
    call per rollout (docs/algorithms.md §6), which gives 15.67 and 16.33.
    """
    nfe = [rollout_nfe(compressed_grid(T, SHIFT, (start, W), 0.4)) for start in range(12)]
    assert nfe == [11, 12, 13, 13, 14, 14, 15, 16, 16, 17, 17, 18]
    assert nfe == [flash_nfe_formula(start, W, 0.4) for start in range(12)]
    assert sum(nfe) / 12 == pytest.approx(44 / 3)
    schedule = [nfe[min(k // 20, 11)] for k in range(300)]
    assert sum(schedule) / 300 == pytest.approx(46 / 3)
    assert 15 < sum(schedule) / 300 + 1 < 17  # the paper's count (+1) is "about 16"


def test_flash_star_nfe():
    """Flash* (frozen window at l = 0, r = 0.2): L = 3, n_post = int(22·0.2) = 4, NFE = 0 + 4 + 3 = 7.
    The paper reports 8: it counts one more model call per rollout than this formula."""
    grid = compressed_grid(T, SHIFT, (0, W), 0.2)
    assert rollout_nfe(grid) == 7 == flash_nfe_formula(0, W, 0.2)
    assert grid.numel() == 8 and grid[-1].item() == 0.0


def test_n_post_guard_keeps_the_grid_ending_at_zero():
    """(T − L)·r < 2 would give the reference n_post = 1 and a grid stopping short of σ = 0."""
    assert num_post_window_points(T, 18, 0.2) == 2  # int(7·0.2) = 1 → guarded to 2
    grid = compressed_grid(T, SHIFT, (15, W), 0.2)
    assert grid.numel() == 18 + 1 + 2 and grid[-1].item() == 0.0
    assert torch.equal(grid[:20], sigma_grid(T, SHIFT)[:20])


@pytest.mark.parametrize(("window", "ratio"), [((21, 4), 0.4), ((20, 4), 0.4), ((3, 4), 1.0), ((3, 4), 2.0)])
def test_no_compression_returns_the_full_grid(window, ratio):
    """Window reaching the last step, no step saved, or ratio ≥ 1: the uncompressed grid."""
    assert torch.equal(compressed_grid(T, SHIFT, window, ratio), sigma_grid(T, SHIFT))


@pytest.mark.parametrize("window", [(22, 4), (-1, 4), (0, 0), (0, 26), (25, 1)])
def test_window_must_fit(window):
    with pytest.raises(ValueError, match="does not fit"):
        compressed_grid(T, SHIFT, window, 0.4)


@pytest.mark.parametrize("ratio", [0.0, -0.5])
def test_ratio_must_be_positive(ratio):
    with pytest.raises(ValueError, match="ratio must be > 0"):
        compressed_grid(T, SHIFT, (0, W), ratio)
