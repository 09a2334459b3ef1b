"""The ``qwenimage`` backbone on a tiny random Qwen-Image snapshot of the real diffusers/transformers
classes, against diffusers' own ``QwenImagePipeline`` loaded from the same snapshot."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mixgrpo.core.parallel import shard_units
from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.core.sigmas import sigma_grid
from mixgrpo.plugins.backbones.qwenimage import PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP, QwenImageBackbone
from mixgrpo.plugins.backbones.tiny import build_tiny_flux
from mixgrpo.plugins.backbones.tiny_qwenimage import build_tiny_qwenimage
from mixgrpo.plugins.samplers.euler import Euler
from mixgrpo.testing import BackboneContract

from .conftest import check_lora_moves_and_reference_is_the_base

PROMPTS = ["a red circle", "two blue squares on the left"]
SIZE, LENGTH, STEPS, SEED = 32, 16, 4, 0


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwenimage(tmp_path_factory.mktemp("qwenimage") / "tiny")


@pytest.fixture(scope="module")
def plain(qwen_dir):
    """No guidance: the network as it is."""
    return QwenImageBackbone(str(qwen_dir), SIZE, SIZE, cfg_scale=1.0, max_sequence_length=LENGTH)


@pytest.fixture(scope="module")
def guided(qwen_dir):
    return QwenImageBackbone(str(qwen_dir), SIZE, SIZE, max_sequence_length=LENGTH)  # true CFG 4, negative " "


def pipeline(root, terminal: bool = True):
    """diffusers' QwenImagePipeline from the snapshot; ``terminal=False`` drops the scheduler's
    ``shift_terminal`` (mixgrpo's dynamic grid has none: see test_the_sigma_grid_is_the_pipelines)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(root, local_files_only=True)
    if not terminal:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(bb, n: int, seed: int = SEED) -> torch.Tensor:
    """The initial noise ``sample_ode`` draws for prompts 0..n-1 (unpacked latents)."""
    return torch.stack([keyed_normal(bb.latent_shape(), seed, "eval", k) for k in range(n)])


def hand_pack(x: torch.Tensor) -> torch.Tensor:
    """2×2 patches row-major, channel-major inside (QwenImagePipeline._pack_latents)."""
    b, c, h, w = x.shape
    return torch.stack([x[:, :, i:i + 2, j:j + 2].reshape(b, -1) for i in range(0, h, 2) for j in range(0, w, 2)], 1)


def flat_grad(bb) -> torch.Tensor:
    """Every trainable gradient in one vector (zeros where none arrives: the last block's text-stream
    output is discarded by the transformer, so its text projections get no gradient)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in bb.trainable_parameters()])


# -- loading and text conditioning -----------------------------------------------------------------
def test_loads_through_the_plugin_manager(qwen_dir):
    bb = PluginManager().create("backbone", "qwenimage", path=str(qwen_dir), height=SIZE, width=SIZE,
                                max_sequence_length=LENGTH)
    assert isinstance(bb, QwenImageBackbone)
    assert (bb.cfg_scale, bb.negative_prompt, bb.calls_per_velocity) == (4.0, " ", 2)  # the model card's CFG
    assert bb.latent_shape() == (4, 16, 16) and bb.image_seq_len() == 64
    assert bb.decode(noise(bb, 2)).shape == (2, 3, SIZE, SIZE)
    assert QwenImageBackbone(str(qwen_dir), cfg_scale=1.0).height == 1024  # the pipeline's default size


def test_template_is_the_pipelines_and_its_prefix_is_34_tokens(qwen_dir, plain):
    pipe = pipeline(qwen_dir)
    assert (PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP) == (pipe.prompt_template_encode,
                                                        pipe.prompt_template_encode_start_idx)
    ids = plain.tokenizer(PROMPT_TEMPLATE.format("a red circle"))["input_ids"]
    words = plain.tokenizer.convert_ids_to_tokens(ids)
    around = words[PROMPT_TEMPLATE_DROP - 3:PROMPT_TEMPLATE_DROP + 3]
    assert around == ["<|im_start|>", "user", "\n", "a", "red", "circle"]


def test_encoding_equals_the_pipelines(qwen_dir, plain):
    pipe = pipeline(qwen_dir)
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=LENGTH)
    cond = plain.encode(PROMPTS)
    n = embeds.shape[1]  # the pipeline pads to its batch's longest prompt, mixgrpo to LENGTH
    assert cond.embeds.shape == (2, LENGTH, 32) and cond.pooled is None
    torch.testing.assert_close(cond.embeds[:, :n], embeds, atol=1e-5, rtol=0)
    assert cond.mask[:, :n].tolist() == mask.bool().tolist() and not cond.mask[:, n:].any()
    assert (cond.embeds[~cond.mask] == 0).all()
    torch.testing.assert_close(plain.encode(PROMPTS[:1]).embeds[0], cond.embeds[0], atol=1e-5, rtol=0)  # batch-free


# -- sampling equals the pipeline --------------------------------------------------------------------
def test_the_sigma_grid_is_the_pipelines(qwen_dir, plain):
    """The pipeline's grid: linspace(1, 1/T) shifted by mu(image tokens) from its scheduler config.
    mixgrpo's grid='dynamic' with the backbone's mu() is it exactly without Qwen-Image's
    shift_terminal (0.02), which stretches the grid so that its last σ before 0 is 0.02."""
    pipe = pipeline(qwen_dir, terminal=False)
    cfg = pipe.scheduler.config
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = cfg.base_shift + slope * (plain.image_seq_len() - cfg.base_image_seq_len)  # calculate_shift by hand
    assert plain.mu() == pytest.approx(mu, abs=1e-12)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    torch.testing.assert_close(pipe.scheduler.sigmas, sigma_grid(STEPS, kind="dynamic", mu=plain.mu()),
                               atol=1e-7, rtol=0)
    terminal = pipeline(qwen_dir).scheduler
    terminal.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    assert float(terminal.sigmas[-2]) == pytest.approx(0.02)


@pytest.mark.parametrize(("scale", "terminal"), [(1.0, False), (4.0, False), (4.0, True)],
                         ids=["no_guidance", "true_cfg", "true_cfg_shift_terminal"])
def test_euler_sampling_equals_the_pipeline(qwen_dir, scale, terminal):
    """Our rollout with the Euler solver on the dynamic grid against QwenImagePipeline from the same
    noise, computing its own mu and grid from its scheduler config, its own prompt encoding, true CFG
    with the negative prompt " " and norm rescaling, and its own VAE decoding; with the scheduler's
    shift_terminal (0.02) on both sides, or off on both."""
    bb = QwenImageBackbone(str(qwen_dir), SIZE, SIZE, cfg_scale=scale, max_sequence_length=LENGTH)
    setup = SamplingSetup(num_steps=STEPS, grid="dynamic", mu=bb.mu(), shift_terminal=0.02 if terminal else None)
    ours = sample_ode(bb, PROMPTS, [SEED] * 2, setup=setup, solver=Euler())
    guidance = {"negative_prompt": " ", "true_cfg_scale": scale} if scale > 1 else {"true_cfg_scale": 1.0}
    with torch.no_grad():
        theirs = pipeline(qwen_dir, terminal=terminal)(
            PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=hand_pack(noise(bb, 2)),
            max_sequence_length=LENGTH, output_type="pt", **guidance).images
    assert ours.shape == theirs.shape == (2, 3, SIZE, SIZE)
    diff = float((ours - theirs).abs().max())
    assert diff < 2e-5, diff
    assert float((ours[0] - ours[1]).abs().max()) > 1e-3  # the prompts matter


def test_true_cfg_is_rescaled_to_the_conditional_norm(guided, plain):
    x, sigma = noise(plain, 2), torch.tensor([0.7, 0.4])
    with torch.no_grad():
        v = guided.velocity(x, sigma, guided.encode(PROMPTS))
        v_c = hand_pack(plain.velocity(x, sigma, plain.encode(PROMPTS)))
        v_u = hand_pack(plain.velocity(x, sigma, plain.encode([" ", " "])))
    comb = v_u + 4.0 * (v_c - v_u)
    expected = comb * v_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(hand_pack(v), expected, atol=1e-5, rtol=0)
    assert float((hand_pack(v) - comb).abs().max()) > 1e-2  # the rescaling is not a no-op


def test_conditional_cfg_gradient_skips_the_unconditional_branch(qwen_dir):
    grads = {}
    for mode in ("conditional", "both"):
        bb = QwenImageBackbone(str(qwen_dir), SIZE, SIZE, cfg_gradient=mode, max_sequence_length=LENGTH)
        v = bb.velocity(noise(bb, 1), torch.tensor([0.5]), bb.encode(PROMPTS[:1]))
        # a weighted sum: |v|² alone would not see v_u, since the rescaling keeps |v| = |v_c| per token
        (v * noise(bb, 1, seed=7)).sum().backward()
        grads[mode] = flat_grad(bb)
    assert float((grads["conditional"] - grads["both"]).abs().max()) > 1e-6


# -- training machinery --------------------------------------------------------------------------------
def test_lora_targets_and_reference(qwen_dir, plain):
    bb = QwenImageBackbone(str(qwen_dir), SIZE, SIZE, cfg_scale=1.0, max_sequence_length=LENGTH, lora_rank=2)
    names = [n for n, p in bb.module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    for target in ("attn.to_q", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.2", "txt_mlp.net.0.proj"):
        assert any(f".{target}.lora_A" in n for n in names), target
    # A and B of 12 projections per block, less the last block's text output (to_add_out, txt_mlp's
    # two layers), which the transformer discards and the backbone freezes
    assert len(names) == 2 * (12 * bb.config.num_layers - 3)
    assert not any(f"blocks.{bb.config.num_layers - 1}.txt_mlp" in n for n in names)
    x, sigma, cond = noise(bb, 1), torch.tensor([0.5]), plain.encode(PROMPTS[:1])
    check_lora_moves_and_reference_is_the_base(bb, plain, x, sigma, cond)


def test_gradient_checkpointing_gives_the_same_gradients(qwen_dir):
    grads = []
    for checkpointing in (False, True):
        bb = QwenImageBackbone(str(qwen_dir), SIZE, SIZE, cfg_scale=1.0, max_sequence_length=LENGTH,
                               gradient_checkpointing=checkpointing)
        bb.module.train()
        bb.velocity(noise(bb, 1), torch.tensor([0.5]), bb.encode(PROMPTS[:1])).square().mean().backward()
        grads.append(flat_grad(bb))
    assert bb.unwrapped().gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_fsdp_shards_the_dual_stream_blocks(plain):
    units = shard_units(plain.unwrapped())
    assert [type(u).__name__ for u in units] == ["QwenImageTransformerBlock"] * plain.config.num_layers


def test_load_snippet_draws_with_true_cfg(guided):
    text = "\n".join(guided.load_snippet("me/export", "a red circle", 50))
    assert "QwenImagePipeline" in text and "true_cfg_scale=4.0" in text and "negative_prompt=' '" in text
    assert guided.model_facts().guidance is None and guided.model_facts().pipeline == "QwenImagePipeline"


# -- bad input -----------------------------------------------------------------------------------------
def test_errors_name_the_problem_and_the_fix(tmp_path, qwen_dir):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        QwenImageBackbone(str(tmp_path / "missing"))
    flux = build_tiny_flux(tmp_path / "flux", with_vae=True, with_t5=True)
    with pytest.raises(ValueError, match="FluxTransformer2DModel.*TrainConfig.backbone = 'flux'"):
        QwenImageBackbone(str(flux))
    for part in ("vae", "text_encoder", "tokenizer"):
        root = tmp_path / f"no_{part}"
        shutil.copytree(qwen_dir, root, ignore=shutil.ignore_patterns(part))
        with pytest.raises(FileNotFoundError, match=f"no {part}/ folder"):
            QwenImageBackbone(str(root))
    with pytest.raises(ValueError, match="max_sequence_length must be in 1..1024"):
        QwenImageBackbone(str(qwen_dir), max_sequence_length=2048)
    with pytest.raises(ValueError, match="multiples of 4"):
        QwenImageBackbone(str(qwen_dir), height=30, width=32, cfg_scale=1.0)


# -- the generic contract ------------------------------------------------------------------------------
class TestQwenImageContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, qwen_dir):
        self.path = str(qwen_dir)

    def make_backbone(self):
        return QwenImageBackbone(self.path, SIZE, SIZE, max_sequence_length=LENGTH)  # true CFG: the doubled batch


class TestQwenImageLoraContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, qwen_dir):
        self.path = str(qwen_dir)

    def make_backbone(self):
        return QwenImageBackbone(self.path, SIZE, SIZE, cfg_scale=1.0, max_sequence_length=LENGTH, lora_rank=2)
