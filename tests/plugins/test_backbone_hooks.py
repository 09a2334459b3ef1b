"""The hooks of ``DiffusersBackbone`` (``combine_guidance``, ``to_vae_latents``/``from_vae_latents``,
``vae_decode``/``vae_encode``): a subclass that overrides one gets exactly its own piece inside the
shared ``velocity``, ``decode`` and ``encode_images``, and the shipped backbones override the hooks
instead of the whole methods."""

from __future__ import annotations

import pytest
import torch

from mixgrpo.plugins.backbones.diffusers_base import DiffusersBackbone
from mixgrpo.plugins.backbones.flux import FluxBackbone
from mixgrpo.plugins.backbones.flux2 import Flux2Backbone
from mixgrpo.plugins.backbones.qwenimage import QwenImageBackbone
from mixgrpo.plugins.backbones.tiny import build_tiny_flux
from mixgrpo.plugins.backbones.tiny_qwenimage import build_tiny_qwenimage
from mixgrpo.plugins.backbones.tiny_zimage import build_tiny_zimage
from mixgrpo.plugins.backbones.zimage import ZImageBackbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/plugins/conftest.py

PROMPTS = ["a red circle", "two blue squares on the left"]


def noise(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def odd_combination(v_uncond, v_cond, sigma):
    """Not CFG: depends on σ and keeps a term in ``v_uncond`` whose gradient the detach must remove."""
    return sigma.view(-1, 1, 1, 1) * v_cond - 2.0 * v_uncond + 0.5


class OddGuidanceFlux(FluxBackbone):
    """A third-party backbone that changes only how the two branches combine."""

    def combine_guidance(self, v_uncond, v_cond, sigma):
        self.seen_sigma = sigma
        return odd_combination(v_uncond, v_cond, sigma)


class DoubledLatentsFlux(FluxBackbone):
    """A third-party backbone that changes only the latent normalisation around the VAE."""

    def to_vae_latents(self, latents):
        return latents * 2.0

    def from_vae_latents(self, z):
        return z.float() / 2.0


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("hooks") / "pixel", num_single_layers=1)


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("hooks") / "latent", with_vae=True, num_single_layers=1)


# -- combine_guidance ------------------------------------------------------------------------------
def test_velocity_returns_the_overridden_combination(pixel_dir):
    bb = OddGuidanceFlux(str(pixel_dir), cfg_scale=3.0, timestep_quantization=1000)
    x, sigma = noise((2, 3, 32, 32)), torch.tensor([0.7345, 0.4])
    cond = bb.encode(PROMPTS)
    with torch.no_grad():
        v = bb.velocity(x, sigma, cond)
        seen = bb.seen_sigma
        bb.cfg_scale = 1.0  # the two branches, one network call each
        v_c, v_u = bb.velocity(x, sigma, cond), bb.velocity(x, sigma, bb.encode(["", ""]))
    # the hook receives the per-sample σ the network was fed (here quantized), not the doubled batch's
    torch.testing.assert_close(seen, torch.tensor([0.734, 0.4]), atol=1e-7, rtol=0)
    torch.testing.assert_close(v, odd_combination(v_u, v_c, seen), atol=1e-5, rtol=0)
    assert not torch.allclose(v, v_u + 3.0 * (v_c - v_u), atol=1e-2)  # the default CFG was replaced


@pytest.mark.parametrize("cfg_gradient", ["conditional", "both"])
def test_the_conditional_detach_applies_before_the_hook(pixel_dir, cfg_gradient):
    bb = OddGuidanceFlux(str(pixel_dir), cfg_scale=3.0, cfg_gradient=cfg_gradient)
    params = bb.trainable_parameters()
    x, sigma = noise((2, 3, 32, 32)), torch.tensor([0.6, 0.3])
    weights = noise((2, 3, 32, 32), seed=1)
    cond, uncond = bb.encode(PROMPTS), bb.encode(["", ""])

    def grads(v):
        return torch.cat([g.flatten() for g in torch.autograd.grad((v * weights).sum(), params)])

    through_hook = grads(bb.velocity(x, sigma, cond))
    bb.cfg_scale = 1.0
    v_c, v_u = bb.velocity(x, sigma, cond), bb.velocity(x, sigma, uncond)
    detached = grads(odd_combination(v_u.detach(), v_c, sigma))
    v_c, v_u = bb.velocity(x, sigma, cond), bb.velocity(x, sigma, uncond)
    both = grads(odd_combination(v_u, v_c, sigma))
    assert not torch.allclose(detached, both, atol=1e-4)  # the detach matters for this combination
    expected = detached if cfg_gradient == "conditional" else both
    torch.testing.assert_close(through_hook, expected, atol=1e-5, rtol=1e-4)


# -- to_vae_latents / from_vae_latents -----------------------------------------------------------
def test_decode_and_encode_images_apply_the_latent_hooks(latent_dir):
    bb = DoubledLatentsFlux(str(latent_dir))
    default = FluxBackbone(str(latent_dir))
    x = noise((2, 4, 16, 16))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        decoded = ((bb.vae.decode(x * 2.0).sample + 1) / 2).clamp(0, 1)  # by hand: the hook's scale of 2
        mode = bb.vae.encode(images * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(bb.decode(x), decoded, atol=1e-6, rtol=0)
    assert not torch.allclose(bb.decode(x), default.decode(x), atol=1e-3)  # not the VAE's scale and shift
    latents = bb.encode_images(images)
    assert latents.dtype == torch.float32 and latents.shape == (2, 4, 16, 16)
    torch.testing.assert_close(latents, mode / 2.0, atol=1e-6, rtol=0)
    torch.testing.assert_close(default.encode_images(images), (mode - 0.1) * 0.5, atol=1e-6, rtol=0)


def test_encode_images_then_decode_round_trips_through_the_hooks(latent_dir):
    bb = DoubledLatentsFlux(str(latent_dir))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the hooks cancel: the VAE's own round trip
        z = bb.vae.encode(images * 2 - 1).latent_dist.mode()
        expected = ((bb.vae.decode(z).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(bb.to_vae_latents(bb.from_vae_latents(z)), z, atol=1e-6, rtol=0)
    torch.testing.assert_close(bb.decode(bb.encode_images(images)), expected, atol=1e-5, rtol=0)


# -- the shipped backbones use the hooks -----------------------------------------------------------
def test_shipped_backbones_override_hooks_not_whole_methods():
    for name in ("velocity", "decode", "encode_images"):
        assert name not in vars(QwenImageBackbone), name
    for name in ("combine_guidance", "to_vae_latents", "from_vae_latents", "vae_decode", "vae_encode"):
        assert name in vars(QwenImageBackbone), name
        assert getattr(QwenImageBackbone, name) is not getattr(DiffusersBackbone, name)
    for name in ("decode", "encode_images"):
        assert name not in vars(Flux2Backbone), name
    assert {"to_vae_latents", "from_vae_latents"} <= set(vars(Flux2Backbone))
    # Z-Image keeps its own velocity (caption lists, t = 1 − σ, negated output) but not its own guidance
    assert "combine_guidance" in vars(ZImageBackbone) and "_guide" not in vars(ZImageBackbone)
    assert "decode" not in vars(ZImageBackbone) and "encode_images" not in vars(ZImageBackbone)


def test_qwenimage_velocity_goes_through_combine_guidance(tmp_path):
    class ConditionalOnly(QwenImageBackbone):
        def combine_guidance(self, v_uncond, v_cond, sigma):
            return v_cond

    root = build_tiny_qwenimage(tmp_path / "qwen")
    bb = ConditionalOnly(str(root), 32, 32, max_sequence_length=16)
    guided = QwenImageBackbone(str(root), 32, 32, max_sequence_length=16)
    x, sigma = noise((2, *bb.latent_shape())), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        v = bb.velocity(x, sigma, bb.encode(PROMPTS))
        v_guided = guided.velocity(x, sigma, guided.encode(PROMPTS))
        bb.cfg_scale = 1.0
        v_c = bb.velocity(x, sigma, bb.encode(PROMPTS))
    torch.testing.assert_close(v, v_c, atol=1e-5, rtol=0)
    assert not torch.allclose(v_guided, v_c, atol=1e-3)  # the shipped combination is not v_c


def test_zimage_velocity_goes_through_combine_guidance(tmp_path):
    class ConditionalOnly(ZImageBackbone):
        def combine_guidance(self, v_uncond, v_cond, sigma):
            return v_cond

    root = build_tiny_zimage(tmp_path / "zimage")
    bb = ConditionalOnly(str(root), guidance_scale=4.0, max_sequence_length=32)
    guided = ZImageBackbone(str(root), guidance_scale=4.0, max_sequence_length=32)
    x, sigma = noise((2, *bb.latent_shape())), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        v = bb.velocity(x, sigma, bb.encode(PROMPTS))
        v_guided = guided.velocity(x, sigma, guided.encode(PROMPTS))
        bb.set_guidance(0.0)
        v_c = bb.velocity(x, sigma, bb.encode(PROMPTS))
    torch.testing.assert_close(v, v_c, atol=1e-5, rtol=0)
    assert not torch.allclose(v_guided, v_c, atol=1e-3)
