"""The ``flux`` backbone on tiny random FLUX models of the real diffusers/transformers classes."""

from __future__ import annotations

import shutil

import pytest
import torch

from mixgrpo.core.plugins import PluginManager
from mixgrpo.plugins.backbones.flux import FluxBackbone
from mixgrpo.plugins.backbones.tiny import build_tiny_flux
from mixgrpo.testing import BackboneContract

PROMPTS = ["a red circle", "two blue squares on the left"]


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "pixel")


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    """A tiny FLUX with a VAE and a T5 sequence encoder (of a width different from CLIP's)."""
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "latent", with_vae=True, with_t5=True, t5_dim=48,
                           num_single_layers=1)


@pytest.fixture(scope="module")
def pixel(pixel_dir):
    return FluxBackbone(str(pixel_dir))


def noise(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hand_pack(x, p):
    """Patch (i, j) in row-major order; inside a patch channel-major, then row, then column."""
    b, _, h, w = x.shape
    return torch.stack([x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
                        for i in range(h // p) for j in range(w // p)], dim=1)


def hand_unpack(tokens, c, h, w, p):
    out = torch.zeros(tokens.shape[0], c, h, w)
    for n in range(tokens.shape[1]):
        i, j = divmod(n, w // p)
        out[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = tokens[:, n].reshape(-1, c, p, p)
    return out


def hand_ids(rows, cols):
    return torch.tensor([[0.0, i, j] for i in range(rows) for j in range(cols)])


def direct_velocity(bb, x, sigma, cond, p):
    """The transformer called by hand, as FluxPipeline would (timestep σ in [0, 1])."""
    c, h, w = x.shape[1:]
    out = bb.unwrapped()(hidden_states=hand_pack(x, p), encoder_hidden_states=cond.embeds,
                         pooled_projections=cond.pooled, timestep=sigma, img_ids=hand_ids(h // p, w // p),
                         txt_ids=torch.zeros(cond.embeds.shape[1], 3), return_dict=False)[0]
    return hand_unpack(out, c, h, w, p)


def capture_kwargs(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    return seen, handle


# -- loading ---------------------------------------------------------------------------------------
def test_loads_through_the_plugin_manager(pixel_dir):
    bb = PluginManager().create("backbone", "flux", path=str(pixel_dir))
    assert isinstance(bb, FluxBackbone)
    assert bb.latent_shape() == (3, 32, 32)  # from mixgrpo.json; pixel space, 4×4 patches
    assert (bb.height, bb.width, bb.patch) == (32, 32, 4)
    assert bb.vae is None and bb.text_encoder_2 is None
    n = sum(p.numel() for p in bb.module.parameters())
    assert 2.0e6 < n < 2.6e6


def test_default_tiny_model_size(pixel):
    transformer = sum(p.numel() for p in pixel.module.parameters())
    text = sum(p.numel() for p in pixel.text_encoder.parameters())
    assert 2.2e6 < transformer + text < 2.6e6  # ≈ 2.4M, the shapes-world base model


def test_errors_are_clear(tmp_path, latent_dir):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        FluxBackbone(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="transformer/"):
        FluxBackbone(str(tmp_path / "empty"))
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(latent_dir, no_t5)
    shutil.rmtree(no_t5 / "text_encoder_2")  # the CLIP sequence (64) cannot feed a 48-wide transformer
    with pytest.raises(ValueError, match="joint_attention_dim is 48"):
        FluxBackbone(str(no_t5))


# -- packing and the transformer call --------------------------------------------------------------
def test_pack_unpack_round_trip(pixel):
    x = noise((2, *pixel.latent_shape()))
    tokens = pixel.pack(x)
    assert tokens.shape == (2, 64, 48)
    torch.testing.assert_close(tokens, hand_pack(x, 4), atol=0, rtol=0)
    torch.testing.assert_close(pixel.unpack(tokens), x, atol=0, rtol=0)


def test_velocity_equals_the_transformer_called_by_hand(pixel_dir):
    bb = FluxBackbone(str(pixel_dir), height=16, width=32)  # non-square: rows and columns differ
    assert bb.latent_shape() == (3, 16, 32)
    cond = bb.encode(PROMPTS)
    x, sigma = noise((2, 3, 16, 32)), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        torch.testing.assert_close(bb.velocity(x, sigma, cond), direct_velocity(bb, x, sigma, cond, 4),
                                   atol=1e-5, rtol=0)


def test_pooled_features_are_clip_at_the_eos_token(pixel):
    cond = pixel.encode(["a red circle"])  # [BOS] a red circle [EOS] → EOS at position 4
    assert cond.embeds.shape == (1, 32, 64) and cond.pooled.shape == (1, 64)
    torch.testing.assert_close(cond.pooled[0], cond.embeds[0, 4])
    assert cond.mask[0].tolist() == [True] * 5 + [False] * 27


def test_pixel_space_decode_inverts_encode_images(pixel):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    latents = pixel.encode_images(images)
    assert latents.min() >= -1 and latents.max() <= 1
    torch.testing.assert_close(pixel.decode(latents), images, atol=1e-6, rtol=0)


# -- VAE + T5 --------------------------------------------------------------------------------------
def test_vae_and_t5_variant(latent_dir):
    bb = FluxBackbone(str(latent_dir))
    assert bb.latent_shape() == (4, 16, 16) and bb.patch == 2
    cond = bb.encode(PROMPTS)
    assert cond.embeds.shape == (2, 77, 48) and cond.pooled.shape == (2, 64)  # T5 sequence, CLIP pooled
    x, sigma = noise((2, 4, 16, 16)), torch.tensor([0.6, 0.1])
    with torch.no_grad():
        torch.testing.assert_close(bb.velocity(x, sigma, cond), direct_velocity(bb, x, sigma, cond, 2),
                                   atol=1e-5, rtol=0)
        expected = bb.vae.decode(x / 0.5 + 0.1).sample  # the tiny VAE's scaling 0.5, shift 0.1
    images = bb.decode(x)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, ((expected + 1) / 2).clamp(0, 1))
    assert bb.encode_images(images).shape == (2, 4, 16, 16)


# -- options ---------------------------------------------------------------------------------------
def test_timestep_quantization(pixel_dir):
    sigma = torch.tensor([0.12345, 0.99999])
    timesteps = {}
    for q in (None, 1000):
        bb = FluxBackbone(str(pixel_dir), timestep_quantization=q)
        seen, handle = capture_kwargs(bb.module)
        bb.velocity(noise((2, 3, 32, 32)), sigma, bb.encode(PROMPTS))
        handle.remove()
        timesteps[q] = seen[-1]["timestep"]
    torch.testing.assert_close(timesteps[None], sigma, atol=0, rtol=0)
    torch.testing.assert_close(timesteps[1000], torch.floor(sigma.double() * 1000).float() / 1000)
    torch.testing.assert_close(timesteps[1000], torch.tensor([0.123, 0.999]))


def test_classifier_free_guidance(pixel_dir, pixel):
    scale = 3.0
    bb = FluxBackbone(str(pixel_dir), cfg_scale=scale)
    x, sigma = noise((2, 3, 32, 32)), torch.tensor([0.7, 0.4])
    seen, handle = capture_kwargs(bb.module)
    with torch.no_grad():
        v = bb.velocity(x, sigma, bb.encode(PROMPTS))
        v_c = pixel.velocity(x, sigma, pixel.encode(PROMPTS))
        v_u = pixel.velocity(x, sigma, pixel.encode(["", ""]))
    handle.remove()
    assert len(seen) == 1 and seen[0]["hidden_states"].shape[0] == 4  # one doubled batch
    torch.testing.assert_close(v, v_u + scale * (v_c - v_u), atol=1e-5, rtol=0)


def test_embedded_guidance(tmp_path, pixel_dir):
    from diffusers import FluxTransformer2DModel

    root = tmp_path / "dev"
    shutil.copytree(pixel_dir, root)
    config = dict(FluxTransformer2DModel.load_config(root / "transformer"), guidance_embeds=True)
    FluxTransformer2DModel.from_config(config).save_pretrained(root / "transformer")
    bb = FluxBackbone(str(root), guidance=4.0)
    seen, handle = capture_kwargs(bb.module)
    bb.velocity(noise((2, 3, 32, 32)), torch.tensor([0.5, 0.5]), bb.encode(PROMPTS))
    handle.remove()
    torch.testing.assert_close(seen[0]["guidance"], torch.tensor([4.0, 4.0]))


def test_bfloat16_keeps_fp32_step_math(pixel_dir, pixel):
    bb = FluxBackbone(str(pixel_dir), dtype="bfloat16")
    # fp32 master weights for the trainable transformer, the frozen text encoder in the compute dtype
    assert {p.dtype for p in bb.module.parameters()} == {torch.float32}
    assert {p.dtype for p in bb.text_encoder.parameters()} == {torch.bfloat16}
    x, sigma = noise((2, 3, 32, 32)), torch.tensor([0.5, 0.2])
    with torch.no_grad():
        v = bb.velocity(x, sigma, bb.encode(PROMPTS))
        ref = pixel.velocity(x, sigma, pixel.encode(PROMPTS))
    assert v.dtype == torch.float32
    assert (v - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_gradient_checkpointing_gives_the_same_gradients(pixel_dir):
    grads = []
    for checkpointing in (False, True):
        bb = FluxBackbone(str(pixel_dir), gradient_checkpointing=checkpointing)
        bb.module.train()
        bb.velocity(noise((1, 3, 32, 32)), torch.tensor([0.5]), bb.encode(PROMPTS[:1])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in bb.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# -- LoRA ------------------------------------------------------------------------------------------
def test_lora_reference_and_save(tmp_path, pixel_dir, pixel):
    bb = FluxBackbone(str(pixel_dir), lora_rank=4)
    names = [n for n, p in bb.module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    assert len(bb.trainable_parameters()) == len(names)
    x, sigma = noise((2, 3, 32, 32)), torch.tensor([0.9, 0.3])
    cond = bb.encode(PROMPTS)
    with torch.no_grad():
        base = pixel.velocity(x, sigma, cond)
        torch.testing.assert_close(bb.velocity(x, sigma, cond), base, atol=1e-6, rtol=0)  # B = 0 at start
        with bb.reference():
            torch.testing.assert_close(bb.velocity(x, sigma, cond), base, atol=1e-6, rtol=0)
        for name, p in bb.module.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        tuned = bb.velocity(x, sigma, cond)
        assert (tuned - base).abs().max() > 1e-3
        with bb.reference():
            torch.testing.assert_close(bb.velocity(x, sigma, cond), base, atol=1e-6, rtol=0)

    merged = tmp_path / "merged"
    shutil.copytree(pixel_dir, merged, ignore=shutil.ignore_patterns("transformer"))
    bb.save_transformer(merged / "transformer")
    reloaded = FluxBackbone(str(merged))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.velocity(x, sigma, cond), tuned, atol=1e-5, rtol=0)
    assert torch.allclose(bb.velocity(x, sigma, cond), tuned)  # saving left the live weights alone


def test_save_full_transformer(tmp_path, pixel_dir, pixel):
    root = tmp_path / "copy"
    shutil.copytree(pixel_dir, root, ignore=shutil.ignore_patterns("transformer"))
    pixel.save_transformer(root / "transformer")
    x, sigma, cond = noise((1, 3, 32, 32)), torch.tensor([0.5]), pixel.encode(PROMPTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(FluxBackbone(str(root)).velocity(x, sigma, cond), pixel.velocity(x, sigma, cond))


# -- the generic contract --------------------------------------------------------------------------
class TestFluxContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, pixel_dir):
        self.path = str(pixel_dir)

    def make_backbone(self):
        return FluxBackbone(self.path)


class TestFluxLoraContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, pixel_dir):
        self.path = str(pixel_dir)

    def make_backbone(self):
        return FluxBackbone(self.path, lora_rank=2)


class TestFluxLatentContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, latent_dir):
        self.path = str(latent_dir)

    def make_backbone(self):
        return FluxBackbone(self.path, cfg_scale=2.0)
