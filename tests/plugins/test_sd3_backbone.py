"""The ``sd3`` backbone on tiny random SD3.5-style models of the real diffusers/transformers classes."""

from __future__ import annotations

import shutil

import pytest
import torch

from mixgrpo.core.plugins import PluginManager
from mixgrpo.plugins.backbones.sd3 import SD3Backbone
from mixgrpo.plugins.backbones.tiny import build_tiny_sd3
from mixgrpo.testing import BackboneContract

from .conftest import check_lora_moves_and_reference_is_the_base

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny")


@pytest.fixture(scope="module")
def plain(sd3_dir):
    """No guidance, exact σ: the network as it is."""
    return SD3Backbone(str(sd3_dir), cfg_scale=1.0, max_sequence_length=12)


def noise(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_loads_through_the_plugin_manager(sd3_dir):
    bb = PluginManager().create("backbone", "sd3", path=str(sd3_dir), max_sequence_length=12)
    assert isinstance(bb, SD3Backbone)
    assert bb.cfg_scale == 4.5  # FlowGRPO's default
    assert bb.latent_shape() == (4, 16, 16)
    cond = bb.encode(PROMPTS)
    # 16 CLIP tokens (both CLIPs side by side, zero-padded to T5's 96) then 12 T5 tokens
    assert cond.embeds.shape == (2, 16 + 12, 96) and cond.pooled.shape == (2, 32 + 48)
    assert (cond.embeds[:, :16, 80:] == 0).all()
    assert bb.decode(noise((2, 4, 16, 16))).shape == (2, 3, 32, 32)


def test_encoding_follows_the_pipeline(plain):
    cond = plain.encode(PROMPTS)
    ids = plain.tokenizers[0](PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    out_1 = plain.clip_encoders[0](input_ids=ids, output_hidden_states=True)
    out_2 = plain.clip_encoders[1](input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(cond.embeds[:, :16, :32], out_1.hidden_states[-2])  # penultimate layer
    torch.testing.assert_close(cond.embeds[:, :16, 32:80], out_2.hidden_states[-2])
    torch.testing.assert_close(cond.pooled, torch.cat([out_1.text_embeds, out_2.text_embeds], dim=-1))
    t5_ids = plain.tokenizer_3(PROMPTS, padding="max_length", max_length=12, return_tensors="pt").input_ids
    torch.testing.assert_close(cond.embeds[:, 16:], plain.text_encoder_3(input_ids=t5_ids)[0])


def test_velocity_equals_the_transformer_called_by_hand(plain):
    cond = plain.encode(PROMPTS)
    x, sigma = noise((2, 4, 16, 16)), torch.tensor([0.75, 0.125])
    with torch.no_grad():
        direct = plain.unwrapped()(hidden_states=x, encoder_hidden_states=cond.embeds,
                                   pooled_projections=cond.pooled, timestep=sigma * 1000, return_dict=False)[0]
        torch.testing.assert_close(plain.velocity(x, sigma, cond), direct, atol=1e-5, rtol=0)


def test_timestep_quantization(sd3_dir):
    bb = SD3Backbone(str(sd3_dir), cfg_scale=1.0, max_sequence_length=4, timestep_quantization=1000)
    seen = []
    handle = bb.module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    bb.velocity(noise((2, 4, 16, 16)), torch.tensor([0.12345, 0.5]), bb.encode(PROMPTS))
    handle.remove()
    torch.testing.assert_close(seen[0], torch.tensor([123.0, 500.0]))


def test_classifier_free_guidance(sd3_dir, plain):
    bb = SD3Backbone(str(sd3_dir), max_sequence_length=12)  # cfg_scale 4.5
    x, sigma = noise((2, 4, 16, 16)), torch.tensor([0.7, 0.4])
    with torch.no_grad():
        v = bb.velocity(x, sigma, bb.encode(PROMPTS))
        v_c = plain.velocity(x, sigma, plain.encode(PROMPTS))
        v_u = plain.velocity(x, sigma, plain.encode(["", ""]))
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), atol=1e-5, rtol=0)


def test_without_t5_uses_zero_tokens(tmp_path, sd3_dir):
    root = tmp_path / "no_t5"
    shutil.copytree(sd3_dir, root, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    bb = SD3Backbone(str(root), cfg_scale=1.0, max_sequence_length=8)
    cond = bb.encode(PROMPTS)
    assert cond.embeds.shape == (2, 24, 96) and (cond.embeds[:, 16:] == 0).all()
    assert torch.isfinite(bb.velocity(noise((2, 4, 16, 16)), torch.tensor([0.5, 0.5]), cond)).all()


def test_lora_targets_and_reference(sd3_dir, plain):
    bb = SD3Backbone(str(sd3_dir), cfg_scale=1.0, max_sequence_length=12, lora_rank=4)
    names = [n for n, p in bb.module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("add_q_proj" in n for n in names) and any("attn.to_q" in n for n in names)
    assert not any("attn2." in n for n in names)  # FlowGRPO adapts the joint attention only
    x, sigma, cond = noise((1, 4, 16, 16)), torch.tensor([0.5]), plain.encode(PROMPTS[:1])
    check_lora_moves_and_reference_is_the_base(bb, plain, x, sigma, cond)


def test_errors_are_clear(tmp_path, sd3_dir):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        SD3Backbone(str(tmp_path / "missing"))
    root = tmp_path / "no_vae"
    shutil.copytree(sd3_dir, root, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(FileNotFoundError, match="vae/"):
        SD3Backbone(str(root))


class TestSD3Contract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, sd3_dir):
        self.path = str(sd3_dir)

    def make_backbone(self):
        return SD3Backbone(self.path, max_sequence_length=12)  # with CFG 4.5: the doubled batch


class TestSD3LoraContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, sd3_dir):
        self.path = str(sd3_dir)

    def make_backbone(self):
        return SD3Backbone(self.path, cfg_scale=1.0, max_sequence_length=12, lora_rank=2)
