"""The ``flux2`` backbone on a tiny FLUX.2-klein snapshot of the real diffusers/transformers classes,
checked against ``Flux2KleinPipeline`` itself: its prompt embeddings, position ids, packing, σ grid,
and its images from the same noise, with and without guidance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mixgrpo.core.parallel import shard_units
from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.core.sigmas import sigma_grid
from mixgrpo.plugins.backbones.flux2 import (
    Flux2Backbone,
    empirical_mu,
    latent_ids,
    patchify,
    text_ids,
    unpatchify,
)
from mixgrpo.plugins.backbones.tiny_flux2 import build_tiny_flux2
from mixgrpo.plugins.samplers.euler import Euler
from mixgrpo.testing import BackboneContract

PROMPTS = ["a red circle", "two blue squares on the left"]
LENGTH = 64  # text tokens: the chat template (25 bytes and specials) and the longest prompt fit
TOL = 2e-5  # float32 rounding; the asserts report the measured differences


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/plugins/conftest.py


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """FLUX.2-klein-base-like: classifier-free guidance."""
    return build_tiny_flux2(tmp_path_factory.mktemp("flux2") / "base")


@pytest.fixture(scope="module")
def distilled_dir(base_dir, tmp_path_factory):
    """The same weights declared step-distilled (FLUX.2-klein-4B-like: no guidance)."""
    root = tmp_path_factory.mktemp("flux2") / "distilled"
    shutil.copytree(base_dir, root)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    return root


@pytest.fixture(scope="module")
def base(base_dir):
    return Flux2Backbone(str(base_dir), max_sequence_length=LENGTH)


@pytest.fixture(scope="module")
def pipe(base_dir):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(base_dir, local_files_only=True)


def noise(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# -- loading and the pipeline's settings ------------------------------------------------------------
def test_loads_through_the_plugin_manager(base_dir, distilled_dir):
    bb = PluginManager().create("backbone", "flux2", path=str(base_dir), max_sequence_length=LENGTH)
    assert isinstance(bb, Flux2Backbone)
    assert bb.latent_shape() == (16, 8, 8)  # 4 VAE channels in 2×2 patches; 32 px / (2 · 2)
    assert (bb.cfg_scale, bb.calls_per_velocity) == (4.0, 2)  # the base model: the pipeline's CFG 4
    facts = bb.model_facts()
    assert (facts.pipeline, facts.family, facts.guidance) == ("Flux2KleinPipeline", "flux2", 4.0)
    distilled = Flux2Backbone(str(distilled_dir), max_sequence_length=LENGTH)
    assert (distilled.cfg_scale, distilled.calls_per_velocity) == (1.0, 1)  # step-distilled: no guidance


def test_encoding_is_the_pipelines(base, pipe):
    from diffusers import Flux2KleinPipeline

    cond = base.encode(PROMPTS)
    expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, PROMPTS,
                                                           max_sequence_length=LENGTH)
    assert cond.embeds.shape == (2, LENGTH, 48) and cond.pooled.shape == (2, 0)
    torch.testing.assert_close(cond.embeds, expected, atol=0, rtol=0)
    # by hand: the chat template's text, then layers 9, 18, 27 side by side per token
    text = "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = base.tokenizer([text], padding="max_length", max_length=LENGTH, return_tensors="pt")
    assert cond.mask[0].tolist() == ids["attention_mask"][0].bool().tolist() and int(cond.mask[0].sum()) == 12 + 25
    hidden = base.text_encoder(**ids, output_hidden_states=True).hidden_states
    for n, layer in enumerate((9, 18, 27)):
        torch.testing.assert_close(cond.embeds[0, :, 16 * n:16 * (n + 1)], hidden[layer][0])


def test_position_ids_and_packing_are_the_pipelines():
    from diffusers import Flux2KleinPipeline as P

    z = noise((2, 16, 6, 10))  # non-square: rows and columns differ
    torch.testing.assert_close(latent_ids(6, 10), P._prepare_latent_ids(z)[0].float(), atol=0, rtol=0)
    torch.testing.assert_close(text_ids(7), P._prepare_text_ids(noise((1, 7, 3)))[0].float(), atol=0, rtol=0)
    vae_latents = noise((2, 4, 12, 20))
    torch.testing.assert_close(patchify(vae_latents), P._patchify_latents(vae_latents), atol=0, rtol=0)
    torch.testing.assert_close(unpatchify(patchify(vae_latents)), vae_latents, atol=0, rtol=0)
    # the transformer's tokens: the latent flattened row-major, as _pack_latents
    torch.testing.assert_close(z.reshape(2, 16, 60).transpose(1, 2), P._pack_latents(z), atol=0, rtol=0)


def test_mu_and_sigma_grid_are_the_pipelines():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from mixgrpo.plugins.backbones.tiny_flux2 import FLUX2_SCHEDULER

    for tokens in (64, 576, 1024, 4096, 4301, 9216):
        for steps in (1, 4, 8, 28, 50, 250):
            assert empirical_mu(tokens, steps) == pytest.approx(compute_empirical_mu(tokens, steps), abs=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)
    for tokens, steps in ((64, 4), (576, 8), (4096, 28)):
        mu = empirical_mu(tokens, steps)
        scheduler.set_timesteps(sigmas=[1 - k / steps for k in range(steps)], mu=mu)  # the pipeline's call
        ours = sigma_grid(steps, kind="dynamic", mu=mu)
        torch.testing.assert_close(ours, scheduler.sigmas.float(), atol=1e-6, rtol=0)


# -- sampling: the backbone's ODE rollout against the pipeline, same noise, the pipeline's own grid -----
def pipeline_images(pipe, bb, prompts, steps, seed=0):
    x = torch.stack([keyed_normal(bb.latent_shape(), seed, "eval", n) for n in range(len(prompts))])
    with torch.no_grad():  # no sigmas: the pipeline computes its own dynamic grid
        return pipe(prompt=prompts, latents=x, height=bb.height, width=bb.width, num_inference_steps=steps,
                    guidance_scale=bb.cfg_scale, max_sequence_length=bb.max_sequence_length,
                    output_type="pt").images


def our_images(bb, prompts, steps, seed=0):
    setup = SamplingSetup(num_steps=steps, grid="dynamic", mu=bb.pipeline_mu(steps))
    return sample_ode(bb, prompts, [seed] * len(prompts), setup=setup, solver=Euler())


@pytest.mark.parametrize("kind, size", [("cfg", (32, 32)), ("plain", (32, 48)), ("distilled", (48, 32))])
def test_sampling_equals_the_pipeline(base_dir, distilled_dir, pipe, kind, size):
    from diffusers import Flux2KleinPipeline

    root = distilled_dir if kind == "distilled" else base_dir
    cfg = {"cfg": None, "plain": 1.0, "distilled": None}[kind]
    bb = Flux2Backbone(str(root), height=size[0], width=size[1], cfg_scale=cfg, max_sequence_length=LENGTH)
    assert bb.calls_per_velocity == (2 if kind == "cfg" else 1)
    reference = pipe if kind != "distilled" else Flux2KleinPipeline.from_pretrained(root, local_files_only=True)
    assert reference.config.is_distilled == (kind == "distilled")
    expected = pipeline_images(reference, bb, PROMPTS, steps=3)
    ours = our_images(bb, PROMPTS, steps=3)
    assert ours.shape == (2, 3, *size)
    assert max_diff(ours, expected) < TOL, max_diff(ours, expected)
    if kind == "cfg":  # guidance moved the images far beyond the tolerance: a lost branch would fail
        bb.cfg_scale = 1.0
        assert max_diff(our_images(bb, PROMPTS, steps=3), expected) > 100 * TOL


def test_decode_and_encode_images_are_the_pipelines(base, pipe):
    latents = noise((2, *base.latent_shape()), seed=3)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    assert (std - 1).abs().max() > 0.1 and mean.abs().max() > 0.1  # the statistics are not the identity
    with torch.no_grad():
        image = pipe.vae.decode(pipe._unpatchify_latents(latents * std + mean), return_dict=False)[0]
        expected = pipe.image_processor.postprocess(image, output_type="pt")
        torch.testing.assert_close(base.decode(latents), expected, atol=1e-6, rtol=0)
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
        reference = pipe._encode_vae_image(images * 2 - 1, generator=None)
        torch.testing.assert_close(base.encode_images(images), reference, atol=1e-5, rtol=0)


# -- guidance ----------------------------------------------------------------------------------------
def test_classifier_free_guidance_is_one_doubled_batch(base_dir, base):
    plain = Flux2Backbone(str(base_dir), cfg_scale=1.0, max_sequence_length=LENGTH)
    x, sigma = noise((2, *base.latent_shape())), torch.tensor([0.7, 0.4])
    seen = []
    handle = base.module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].shape[0]),
                                                   with_kwargs=True)
    with torch.no_grad():
        v = base.velocity(x, sigma, base.encode(PROMPTS))
        v_c = plain.velocity(x, sigma, plain.encode(PROMPTS))
        v_u = plain.velocity(x, sigma, plain.encode(["", ""]))  # the pipeline's negative prompt is ""
    handle.remove()
    assert seen == [4]
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u), atol=1e-5, rtol=0)


def test_a_distilled_model_takes_no_guidance(distilled_dir):
    with pytest.raises(ValueError, match="step-distilled.*cfg_scale = 1"):
        Flux2Backbone(str(distilled_dir), cfg_scale=4.0)
    bb = Flux2Backbone(str(distilled_dir), max_sequence_length=LENGTH)
    with pytest.raises(ValueError, match="step-distilled"):
        bb.set_guidance(3.0)
    assert bb.cfg_scale == 1.0


# -- training options ---------------------------------------------------------------------------------
def test_lora_targets_are_flux2_modules(base_dir):
    bb = Flux2Backbone(str(base_dir), cfg_scale=1.0, max_sequence_length=LENGTH, lora_rank=2)
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in bb.module.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n, p in bb.module.named_parameters() if p.requires_grad)
    short = {n.split(".", 4)[-1] for n in adapted}  # without base_model.model.<blocks>.<i>
    assert {"attn.to_q", "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out", "ff.linear_in",
            "ff_context.linear_out", "attn.to_qkv_mlp_proj"} <= short
    assert any("single_transformer_blocks" in n for n in adapted)


def test_fsdp_shards_the_flux2_blocks(base):
    from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock

    units = shard_units(base.unwrapped())
    assert [type(u) for u in units] == [Flux2TransformerBlock] + [Flux2SingleTransformerBlock] * 2


def test_gradient_checkpointing_gives_the_same_gradients(base_dir):
    grads = []
    for checkpointing in (False, True):
        bb = Flux2Backbone(str(base_dir), cfg_scale=1.0, max_sequence_length=LENGTH,
                           gradient_checkpointing=checkpointing)
        bb.module.train()
        bb.velocity(noise((1, 16, 8, 8)), torch.tensor([0.5]), bb.encode(PROMPTS[:1])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in bb.trainable_parameters()]))
    assert bb.unwrapped().gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bfloat16_keeps_fp32_master_weights(base_dir, base):
    bb = Flux2Backbone(str(base_dir), dtype="bfloat16", vae_dtype="float32", max_sequence_length=LENGTH)
    assert {p.dtype for p in bb.module.parameters()} == {torch.float32}
    assert {p.dtype for p in bb.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bb.vae.parameters()} == {torch.float32}
    x, sigma = noise((2, 16, 8, 8)), torch.tensor([0.5, 0.2])
    with torch.no_grad():
        v, ref = bb.velocity(x, sigma, bb.encode(PROMPTS)), base.velocity(x, sigma, base.encode(PROMPTS))
    assert v.dtype == torch.float32 and (v - ref).abs().mean() < 0.05 * ref.abs().mean()


# -- bad input -----------------------------------------------------------------------------------------
def test_errors_name_the_problem_and_the_fix(tmp_path, base_dir):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        Flux2Backbone(str(tmp_path / "missing"))
    for found, plugin, pipeline in (("FluxTransformer2DModel", "flux", "FluxPipeline"),
                                    ("SD3Transformer2DModel", "sd3", "StableDiffusion3Pipeline")):
        other = tmp_path / plugin / "transformer"  # a snapshot's layout: model_index.json beside it
        other.mkdir(parents=True)
        (other / "config.json").write_text(json.dumps({"_class_name": found}))
        (other.parent / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        with pytest.raises(ValueError, match=f"TrainConfig.backbone = '{plugin}'"):
            Flux2Backbone(str(other.parent))
    for missing, needle in (("text_encoder", "text_encoder/ folder"), ("vae", "vae/ folder"),
                            ("tokenizer", "tokenizer/ folder")):
        root = tmp_path / f"no_{missing}"
        shutil.copytree(base_dir, root, ignore=shutil.ignore_patterns(missing))
        with pytest.raises(FileNotFoundError, match=needle):
            Flux2Backbone(str(root))
    dev = tmp_path / "dev"
    shutil.copytree(base_dir, dev)
    (dev / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    with pytest.raises(ValueError, match="FLUX.2-dev"):
        Flux2Backbone(str(dev))
    with pytest.raises(ValueError, match="multiples of 4"):
        Flux2Backbone(str(base_dir), height=30)
    with pytest.raises(ValueError, match="has 28 layers"):
        Flux2Backbone(str(base_dir), text_encoder_out_layers=(9, 18, 40))


# -- the generic contract ------------------------------------------------------------------------------
class TestFlux2Contract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, base_dir):
        self.path = str(base_dir)

    def make_backbone(self):
        return Flux2Backbone(self.path, max_sequence_length=LENGTH)  # CFG 4: the doubled batch


class TestFlux2LoraContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, distilled_dir):
        self.path = str(distilled_dir)

    def make_backbone(self):
        return Flux2Backbone(self.path, max_sequence_length=LENGTH, lora_rank=2)


# -- the benchmark's architecture ----------------------------------------------------------------------
def test_benchmark_config_is_klein_4b_and_its_stand_in_loads(tmp_path):
    """benchmarks/configs/flux2-klein.json builds a 3.9B transformer whose text width is three Qwen3-4B
    layers; shrunk, the same folder layout with the note's one-layer Qwen3 stand-in loads and runs."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from mixgrpo.plugins.backbones.tiny_flux2 import build_qwen_tokenizer, tiny_qwen3

    arch = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/configs/flux2-klein.json").read_text())
    public = {part: {k: v for k, v in arch[part].items() if not k.startswith("_")} for part in ("transformer", "vae")}
    with torch.device("meta"):
        count = sum(p.numel() for p in Flux2Transformer2DModel.from_config(public["transformer"]).parameters())
    assert 3.8e9 < count < 4.0e9, count
    text = arch["text"]
    stacked = len(text["text_encoder_out_layers"]) * text["qwen3_hidden_size"]
    assert public["transformer"]["joint_attention_dim"] == stacked == 3 * 2560
    assert public["transformer"]["in_channels"] == 4 * public["vae"]["latent_channels"]
    shrink = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
              "joint_attention_dim": 48, "timestep_guidance_channels": 32, "axes_dims_rope": [4, 4, 4, 4]}
    Flux2Transformer2DModel.from_config({**public["transformer"], **shrink}).save_pretrained(tmp_path / "transformer")
    AutoencoderKLFlux2.from_config({**public["vae"], "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1,
                                    "norm_num_groups": 4}).save_pretrained(tmp_path / "vae")
    tokenizer = build_qwen_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    tiny_qwen3(len(tokenizer), 16, 1, 64).save_pretrained(tmp_path / "text_encoder")
    bb = Flux2Backbone(str(tmp_path), height=32, width=32, max_sequence_length=64,
                       text_encoder_out_layers=text["text_encoder_out_layers"])
    assert bb.latent_shape() == (128, 2, 2) and bb.cfg_scale == 4.0
    v = bb.velocity(noise((1, 128, 2, 2)), torch.tensor([0.5]), bb.encode(PROMPTS[:1]))
    assert v.shape == (1, 128, 2, 2) and torch.isfinite(v).all()
