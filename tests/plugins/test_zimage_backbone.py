"""The ``zimage`` backbone on a tiny random Z-Image snapshot of the real diffusers/transformers classes,
against ``ZImagePipeline`` itself: its prompt encoding, its transformer call and its sampling loop."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.plugins.backbones.tiny import build_tiny_flux
from mixgrpo.plugins.backbones.tiny_zimage import build_tiny_zimage
from mixgrpo.plugins.backbones.zimage import ZIMAGE_LORA_TARGETS, ZImageBackbone, scheduler_shift
from mixgrpo.plugins.samplers.euler import Euler
from mixgrpo.testing import BackboneContract

from .conftest import check_lora_moves_and_reference_is_the_base

PROMPTS = ["a red circle", "two blue squares on the left"]
LENGTH = 32  # chat-templated prompt tokens (the pipeline's 512 is far beyond the tiny context)
STEPS = 4
TOL = 2e-5  # float32 rounding


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    return build_tiny_zimage(tmp_path_factory.mktemp("zimage") / "tiny")


@pytest.fixture(scope="module")
def plain(zimage_dir):
    """No guidance: the network as it is."""
    return ZImageBackbone(str(zimage_dir), guidance_scale=0.0, max_sequence_length=LENGTH)


@pytest.fixture(scope="module")
def pipe(zimage_dir):
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline.from_pretrained(zimage_dir)  # the snapshot's own scheduler (static shift 3)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def noise(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# -- loading ---------------------------------------------------------------------------------------
def test_loads_through_the_plugin_manager(zimage_dir):
    bb = PluginManager().create("backbone", "zimage", path=str(zimage_dir), max_sequence_length=LENGTH)
    assert isinstance(bb, ZImageBackbone)
    assert bb.cfg_scale == 6.0 and bb.calls_per_velocity == 2  # the pipeline's guidance_scale 5 = s − 1
    assert bb.model_facts().guidance == 5.0 and bb.model_facts().pipeline == "ZImagePipeline"
    assert bb.latent_shape() == (4, 16, 16) and (bb.height, bb.width) == (32, 32)
    assert bb.decode(noise((2, 4, 16, 16))).shape == (2, 3, 32, 32)
    assert scheduler_shift(zimage_dir) == 3.0


def test_without_mixgrpo_json_the_size_is_the_pipelines_default(tmp_path, zimage_dir):
    root = tmp_path / "snapshot"
    shutil.copytree(zimage_dir, root, ignore=shutil.ignore_patterns("mixgrpo.json"))
    with pytest.raises(ValueError, match="patch grid"):  # 1024 px: 512×512 patches, beyond the tiny RoPE
        ZImageBackbone(str(root), max_sequence_length=LENGTH)
    assert ZImageBackbone(str(root), height=16, width=48, max_sequence_length=LENGTH).latent_shape() == (4, 8, 24)


# -- conditioning, the transformer call, guidance --------------------------------------------------
def test_encoding_is_the_pipelines(plain, pipe):
    cond = plain.encode(PROMPTS)
    assert cond.embeds.shape == (2, LENGTH, 32) and cond.pooled is None
    theirs, negative = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=True,
                                          max_sequence_length=LENGTH)
    ours = plain.captions(cond)
    assert [len(c) for c in ours] == [len(c) for c in theirs] == [8, 11]  # 5 chat-template tokens + the words
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(plain.captions(plain.negative())[0], negative[0], atol=0, rtol=0)
    assert (cond.embeds[0, 8:] == 0).all()


def test_velocity_is_the_transformer_negated_at_one_minus_sigma(plain):
    cond = plain.encode(PROMPTS)
    x, sigma = noise((2, 4, 16, 16)), torch.tensor([0.75, 0.125])
    with torch.no_grad():
        out = plain.unwrapped()([x[0][:, None], x[1][:, None]], 1 - sigma, plain.captions(cond), return_dict=False)[0]
        torch.testing.assert_close(plain.velocity(x, sigma, cond), -torch.stack(out)[:, :, 0], atol=1e-5, rtol=0)


def test_timestep_quantization(zimage_dir):
    bb = ZImageBackbone(str(zimage_dir), guidance_scale=0.0, max_sequence_length=LENGTH, timestep_quantization=1000)
    seen = []
    handle = bb.module.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    bb.velocity(noise((2, 4, 16, 16)), torch.tensor([0.12345, 0.5]), bb.encode(PROMPTS))
    handle.remove()
    torch.testing.assert_close(seen[0], torch.tensor([1 - 0.123, 0.5]))


def test_guidance_is_the_pipelines_form(zimage_dir, plain):
    """``v_c + g·(v_c − v_n)``; the norm cap and the truncation on top, from the plain network's branches."""
    x, sigma = noise((2, 4, 16, 16)), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        v_c = plain.velocity(x, sigma, plain.encode(PROMPTS))
        v_n = plain.velocity(x, sigma, plain.encode(["blue", "blue"]))
        guided = ZImageBackbone(str(zimage_dir), guidance_scale=3.0, negative_prompt="blue",
                                max_sequence_length=LENGTH)
        torch.testing.assert_close(guided.velocity(x, sigma, plain.encode(PROMPTS)), v_c + 3 * (v_c - v_n),
                                   atol=1e-5, rtol=0)
        capped = ZImageBackbone(str(zimage_dir), guidance_scale=3.0, negative_prompt="blue",
                                cfg_normalization=1.0, cfg_truncation=0.5, max_sequence_length=LENGTH)
        v = capped.velocity(x, sigma, plain.encode(PROMPTS))
    full = v_c + 3 * (v_c - v_n)
    torch.testing.assert_close(v[0], full[0] * v_c[0].norm() / full[0].norm(), atol=1e-5, rtol=0)  # 1 − σ = .3
    torch.testing.assert_close(v[1], v_c[1], atol=1e-5, rtol=0)  # 1 − σ = .8 > 0.5: no guidance
    assert capped.calls_per_velocity == 2  # both branches still run


# -- sampling equals ZImagePipeline ----------------------------------------------------------------
GUIDANCE = {
    "no guidance (Turbo)": {"guidance_scale": 0.0},
    "guidance 4": {"guidance_scale": 4.0},
    "guidance 4, normalized, truncated, negative prompt": {"guidance_scale": 4.0, "cfg_normalization": 1.0,
                                                           "cfg_truncation": 0.5, "negative_prompt": "blue"},
}


def pipeline_images(pipe, bb, settings):
    """ZImagePipeline's images from our keyed noise, on its own default grid and scheduler."""
    x = torch.stack([keyed_normal(bb.latent_shape(), 0, "eval", n) for n in range(len(PROMPTS))])
    kwargs = {k: v for k, v in settings.items() if k != "negative_prompt"}
    negative = [settings["negative_prompt"]] * len(PROMPTS) if "negative_prompt" in settings else None
    return pipe(list(PROMPTS), height=bb.height, width=bb.width, num_inference_steps=STEPS, latents=x,
                negative_prompt=negative, max_sequence_length=LENGTH, output_type="pt", **kwargs).images


@pytest.mark.parametrize("settings", GUIDANCE.values(), ids=GUIDANCE.keys())
def test_euler_sampling_equals_the_pipeline(zimage_dir, pipe, plain, settings):
    """Our rollout walks the static grid with the snapshot's shift; the pipeline walks
    ``linspace(1, 1/T, T)`` shifted by its scheduler. Same noise, same images."""
    bb = ZImageBackbone(str(zimage_dir), max_sequence_length=LENGTH, **settings)
    setup = SamplingSetup(num_steps=STEPS, shift=scheduler_shift(zimage_dir))
    ours = sample_ode(bb, PROMPTS, [0, 0], setup=setup, solver=Euler())
    theirs = pipeline_images(pipe, bb, settings)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert max_diff(ours, theirs) < TOL, max_diff(ours, theirs)
    if settings["guidance_scale"] > 0:  # guidance moved the images far beyond the tolerance
        unguided = sample_ode(plain, PROMPTS, [0, 0], setup=setup, solver=Euler())
        assert max_diff(ours, unguided) > 100 * TOL, max_diff(ours, unguided)


def test_nfe_counts_both_branches(zimage_dir):
    bb = ZImageBackbone(str(zimage_dir), guidance_scale=4.0, max_sequence_length=LENGTH)
    rows = []
    handle = bb.module.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    sample_ode(bb, PROMPTS, [0, 0], setup=SamplingSetup(num_steps=STEPS), solver=Euler())
    handle.remove()
    assert rows == [2 * len(PROMPTS)] * STEPS  # one doubled batch per step: 2 evaluations per sample


# -- LoRA -------------------------------------------------------------------------------------------
def test_lora_targets_and_reference(zimage_dir, plain):
    bb = ZImageBackbone(str(zimage_dir), guidance_scale=0.0, max_sequence_length=LENGTH, lora_rank=4)
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in bb.module.named_parameters() if p.requires_grad}
    assert adapted and all(any(n.endswith(t) for t in ZIMAGE_LORA_TARGETS) for n in adapted)
    blocks = 2 + 1 + 1  # main layers, noise refiner, context refiner
    assert len(adapted) == blocks * len(ZIMAGE_LORA_TARGETS)
    x, sigma, cond = noise((1, 4, 16, 16)), torch.tensor([0.5]), plain.encode(PROMPTS[:1])
    check_lora_moves_and_reference_is_the_base(bb, plain, x, sigma, cond)


# -- memory: FSDP units and gradient checkpointing ---------------------------------------------------
def test_fsdp_shards_every_transformer_block(plain):
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from mixgrpo.core.parallel import shard_units

    blocks = [m for m in plain.unwrapped().modules() if isinstance(m, ZImageTransformerBlock)]
    assert [id(u) for u in shard_units(plain.unwrapped())] == [id(b) for b in blocks] and len(blocks) == 4


def test_gradient_checkpointing_recomputes_and_keeps_the_gradient(zimage_dir):
    x, sigma = noise((2, 4, 16, 16)), torch.tensor([0.6, 0.3])
    grads, calls = [], []
    for checkpointing in (False, True):
        bb = ZImageBackbone(str(zimage_dir), guidance_scale=0.0, max_sequence_length=LENGTH,
                            gradient_checkpointing=checkpointing)
        bb.module.train()
        calls.append(0)
        handle = bb.unwrapped().layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        bb.velocity(x, sigma, bb.encode(PROMPTS)).square().sum().backward()
        handle.remove()
        grads.append(torch.cat([p.grad.flatten() for p in bb.trainable_parameters()]))
    assert calls == [1, 2]  # the checkpointed block ran again in the backward pass
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# -- bad input --------------------------------------------------------------------------------------
def test_another_familys_snapshot_names_its_plugin(tmp_path):
    flux = build_tiny_flux(tmp_path / "flux", num_single_layers=1)
    with pytest.raises(ValueError, match="holds a FluxTransformer2DModel.*TrainConfig.backbone = 'flux'"):
        ZImageBackbone(str(flux))


@pytest.mark.parametrize("missing", ["text_encoder", "tokenizer", "vae", "transformer"])
def test_a_missing_component_is_named(tmp_path, zimage_dir, missing):
    root = tmp_path / "partial"
    shutil.copytree(zimage_dir, root, ignore=shutil.ignore_patterns(missing))
    with pytest.raises(FileNotFoundError, match=f"no {missing}/ folder"):
        ZImageBackbone(str(root), max_sequence_length=LENGTH)


def test_other_errors_are_clear(tmp_path, zimage_dir):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ZImageBackbone(str(tmp_path / "missing"))
    root = tmp_path / "no_template"
    shutil.copytree(zimage_dir, root)
    (root / "tokenizer" / "chat_template.jinja").unlink()
    config = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        ZImageBackbone(str(root), max_sequence_length=LENGTH)
    with pytest.raises(ValueError, match="caption positions"):
        ZImageBackbone(str(zimage_dir), max_sequence_length=512)
    with pytest.raises(ValueError, match="multiples of 4"):
        ZImageBackbone(str(zimage_dir), height=30, max_sequence_length=LENGTH)
    with pytest.raises(ValueError, match="guidance_scale"):
        ZImageBackbone(str(zimage_dir), guidance_scale=-1.0)


# -- the contract -----------------------------------------------------------------------------------
class TestZImageContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, zimage_dir):
        self.path = str(zimage_dir)

    def make_backbone(self):
        return ZImageBackbone(self.path, guidance_scale=4.0, max_sequence_length=LENGTH)  # the doubled batch


class TestZImageLoraContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, zimage_dir):
        self.path = str(zimage_dir)

    def make_backbone(self):
        return ZImageBackbone(self.path, guidance_scale=0.0, max_sequence_length=LENGTH, lora_rank=2)
