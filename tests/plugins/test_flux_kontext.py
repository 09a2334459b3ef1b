"""The ``flux_kontext`` backbone on a tiny FLUX.1-Kontext snapshot: sampling equal to diffusers'
``FluxKontextPipeline`` from the same noise, source images and grid; the source's tokens and position
ids; every method preset training two iterations on edits with the ``edit_clip`` reward; the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.core.config import load_config
from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.core.trainer import Trainer
from mixgrpo.core.types import EditPrompt
from mixgrpo.plugins import prompts_edit
from mixgrpo.plugins.backbones import flux_kontext
from mixgrpo.plugins.backbones.flux import image_ids
from mixgrpo.plugins.backbones.flux_kontext import FluxKontextBackbone, source_ids
from mixgrpo.plugins.backbones.tiny_kontext import build_tiny_kontext
from mixgrpo.plugins.rewards import edit
from mixgrpo.plugins.samplers.euler import Euler
from mixgrpo.testing import BackboneContract

from .reward_refs import make_tiny_clip

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTIONS = ["a red circle", "two blue squares on the left", "a green star", "a yellow ring"]
SOURCE = (24, 40)  # the source's size differs from the 32×32 output: its own token grid and ids
TEXT = 32  # T5 tokens per prompt (the tiny tokenizers' length)
TOL = 1e-5  # images in [0, 1]; float rounding only


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/plugins/conftest.py


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    return build_tiny_kontext(tmp_path_factory.mktemp("kontext") / "snapshot")


@pytest.fixture(scope="module")
def edits(tmp_path_factory) -> list[EditPrompt]:
    """Four edits of four 24×40 source PNGs (smooth colour ramps with a square, so the VAE sees structure)."""
    folder = tmp_path_factory.mktemp("sources")
    out = []
    for n, instruction in enumerate(INSTRUCTIONS):
        y, x = np.mgrid[0:SOURCE[0], 0:SOURCE[1]]
        image = np.stack([(x * 6 + 40 * n) % 256, (y * 9 + 60 * n) % 256, np.full_like(x, 50 * n)], -1)
        image[4 + n:12 + n, 10:18] = 255 - 40 * n
        Image.fromarray(image.astype(np.uint8)).save(folder / f"source{n}.png")
        out.append(EditPrompt(instruction, folder / f"source{n}.png"))
    return out


@pytest.fixture(scope="module")
def base(kontext_dir):
    return FluxKontextBackbone(str(kontext_dir), source_height=SOURCE[0], source_width=SOURCE[1],
                               max_sequence_length=TEXT)


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# -- loading, ids, the transformer call ----------------------------------------------------------------
def test_loads_through_the_plugin_manager(kontext_dir):
    bb = plugins().create("backbone", "flux_kontext", path=str(kontext_dir))
    assert isinstance(bb, FluxKontextBackbone) and bb.config.guidance_embeds
    assert bb.latent_shape() == (4, 16, 16) and (bb.source_height, bb.source_width) == (32, 32)  # default: output
    assert bb.guidance == 2.5 and bb.max_sequence_length == 512
    assert bb.model_facts().pipeline == "FluxKontextPipeline"
    assert bb.pipeline_mu() == pytest.approx(0.5 + 0.65 * (64 - 256) / 3840)  # flux_mu of 8×8 image tokens


def test_position_ids_are_the_pipelines():
    from diffusers import FluxKontextPipeline as P

    torch.testing.assert_close(image_ids(6, 10), P._prepare_latent_image_ids(1, 6, 10, "cpu", torch.float32))
    expected = P._prepare_latent_image_ids(1, 6, 10, "cpu", torch.float32)
    expected[..., 0] = 1  # as prepare_latents marks the source's tokens
    torch.testing.assert_close(source_ids(6, 10), expected, atol=0, rtol=0)


def test_the_transformer_sees_the_source_tokens_and_returns_the_images(base, edits):
    seen = []
    handle = base.module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    x, sigma = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7, 0.3])
    cond = base.encode(edits[:2])
    assert cond.extra["source_latents"].shape == (2, 4, 12, 20)
    with torch.no_grad():
        v = base.velocity(x, sigma, cond)
        other = base.velocity(x, sigma, base.encode([EditPrompt(str(edits[0]), edits[2].image), edits[1]]))
    handle.remove()
    assert v.shape == x.shape and seen[0]["hidden_states"].shape == (2, 64 + 60, 16)
    torch.testing.assert_close(seen[0]["img_ids"], torch.cat([image_ids(8, 8), source_ids(6, 10)]))
    torch.testing.assert_close(seen[0]["guidance"], torch.tensor([2.5, 2.5]))
    assert max_diff(v[0], other[0]) > 1e-3  # another source image, the same instruction: another velocity
    torch.testing.assert_close(v[1], other[1], atol=1e-6, rtol=0)  # rows stay independent


def test_plain_prompts_and_bad_sizes_are_refused(kontext_dir, base):
    with pytest.raises(ValueError, match=r"prompt 'a red circle' carries none.*prompt_set = 'edit'"):
        base.encode(["a red circle"])
    with pytest.raises(ValueError, match=r"source_height and source_width must be multiples of 4, got 30×32"):
        FluxKontextBackbone(str(kontext_dir), source_height=30)
    text_only = base.negative()  # the empty prompt's text conditioning: no source latents of its own
    with pytest.raises(ValueError, match=r"needs the source latents of each of the 1 samples.*got none"):
        base.velocity(torch.zeros(1, 4, 16, 16), torch.tensor([0.5]), text_only)


# -- sampling equals the pipeline ----------------------------------------------------------------------
def pipeline_images(pipe, bb, prompts, steps, cfg):
    """FluxKontextPipeline's images from ``sample_ode``'s noise, its own dynamic grid and the sources as
    given (no auto-resize: the 24×40 sources are already a size the backbone uses)."""
    from diffusers import FluxKontextPipeline

    x = torch.stack([keyed_normal(bb.latent_shape(), 0, "eval", n) for n in range(len(prompts))])
    c, h, w = bb.latent_shape()
    guidance = {"true_cfg_scale": cfg, "negative_prompt": [""] * len(prompts)} if cfg > 1 else {}
    with torch.no_grad():
        return pipe(image=[Image.open(p.image) for p in prompts], prompt=[str(p) for p in prompts],
                    latents=FluxKontextPipeline._pack_latents(x, len(prompts), c, h, w), height=bb.height,
                    width=bb.width, max_area=bb.height * bb.width, _auto_resize=False, num_inference_steps=steps,
                    guidance_scale=bb.guidance, max_sequence_length=TEXT, output_type="pt", **guidance).images


@pytest.mark.parametrize("cfg", [1.0, 2.0], ids=["distilled_guidance", "true_cfg"])
def test_euler_sampling_equals_the_pipeline(pipe, base, edits, cfg):
    base.cfg_scale = cfg
    try:
        setup = SamplingSetup(num_steps=3, grid="dynamic", mu=base.pipeline_mu())
        ours = sample_ode(base, edits[:2], [0, 0], setup=setup, solver=Euler())
        expected = pipeline_images(pipe, base, edits[:2], steps=3, cfg=cfg)
        assert ours.shape == (2, 3, 32, 32)
        assert max_diff(ours, expected) < TOL, max_diff(ours, expected)
        # the same noise with the other source images: the images move well beyond the tolerance (the
        # random tiny model attends little to the source: 7e-4 here, against 7e-7 from the pipeline)
        swapped = [EditPrompt(str(edits[0]), edits[1].image), EditPrompt(str(edits[1]), edits[0].image)]
        assert max_diff(sample_ode(base, swapped, [0, 0], setup=setup, solver=Euler()), expected) > 30 * TOL
    finally:
        base.cfg_scale = 1.0


# -- the generic contract ------------------------------------------------------------------------------
class TestKontextContract(BackboneContract):
    @pytest.fixture(autouse=True)
    def _model(self, kontext_dir, edits):
        self.path, self.prompts = str(kontext_dir), tuple(edits[:3])

    def make_backbone(self):
        return FluxKontextBackbone(self.path, source_height=SOURCE[0], source_width=SOURCE[1],
                                   max_sequence_length=TEXT, lora_rank=2)


# -- training ------------------------------------------------------------------------------------------
METHODS = ["flowgrpo", "flowgrpo_fast", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star",
           "grpo_guard", "diffusionnft", "awm"]


@pytest.fixture(scope="module")
def edits_file(edits, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("edits") / "edits.jsonl"
    path.write_text("".join(json.dumps({"image": p.image, "instruction": str(p)}) + "\n" for p in edits))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=5)


def plugins() -> PluginManager:
    """The built-ins plus the editing plugins (once pyproject registers them, as they are)."""
    pm = PluginManager()
    missing = [module for module, kind, name in ((flux_kontext, "backbone", "flux_kontext"),
                                                  (prompts_edit, "prompt_set", "edit"), (edit, "reward", "edit_clip"))
               if name not in pm.names(kind)]
    return PluginManager(plugins=missing) if missing else pm


def bindings(kontext_dir, edits_file, clip_dir) -> list[str]:
    return ["TrainConfig.backbone = 'flux_kontext'", f"FluxKontextBackbone.path = '{kontext_dir}'",
            f"FluxKontextBackbone.source_height = {SOURCE[0]}", f"FluxKontextBackbone.source_width = {SOURCE[1]}",
            f"FluxKontextBackbone.max_sequence_length = {TEXT}", "FluxKontextBackbone.lora_rank = 2",
            "TrainConfig.prompt_set = 'edit'", f"EditPrompts.train_path = '{edits_file}'",
            f"EditPrompts.eval_path = '{edits_file}'", "TrainConfig.rewards = {'edit_clip': 1.0}",
            f"EditCLIPReward.path = '{clip_dir}'", "EditCLIPReward.device = 'cpu'",
            "TrainConfig.progress = False", "TrainConfig.trackers = []"]


SMALL = ["TrainConfig.num_steps = 4", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
         "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 4", "TrainConfig.iterations = 2",
         "TrainConfig.learning_rate = 1e-3", "ProgressiveWindow.window_size = 2", "FixedWindow.window_size = 2"]


def train(out: Path, gin: Path, *extra: str) -> tuple[Trainer, list[dict]]:
    config, pm = load_config(gin, [*extra, f"TrainConfig.output_dir = '{out}'"], pm=plugins())
    trainer = Trainer(config, pm)
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_two_iterations_on_policy(method, kontext_dir, edits_file, clip_dir, tmp_path):
    trainer, rows = train(tmp_path / "run", ROOT / "experiments" / "methods" / f"{method}.gin", *SMALL,
                          *bindings(kontext_dir, edits_file, clip_dir))
    rows = [r for r in rows if "policy/ratio_mean" in r]
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert isinstance(trainer.backbone, FluxKontextBackbone)
    # the edit reward scored every sample against its source: finite, not failed
    assert all(r["reward/edit_clip/failed"] == 0 and np.isfinite(r["reward/edit_clip/mean"]) for r in rows)
    # the first minibatch recomputes the rollout's own velocities/log-probs: the ratio is 1
    assert rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["policy/onpolicy_ratio_dev"] < 1e-6
    assert all(np.isfinite(r["loss/policy"]) for r in rows)
    moved = [p for n, p in trainer.backbone.module.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert moved, "training changed no LoRA weight"


# -- the recipe ----------------------------------------------------------------------------------------
RECIPE = ROOT / "experiments" / "flux_kontext_edit.gin"


def recipe_paths(kontext_dir, edits_file, clip_dir) -> list[str]:
    return [f"KONTEXT_PATH = '{kontext_dir}'", f"EDITS_TRAIN = '{edits_file}'", f"EDITS_TEST = '{edits_file}'",
            f"CLIP_PATH = '{clip_dir}'"]


def test_recipe_settings(kontext_dir, edits_file, clip_dir):
    from mixgrpo.core.sigmas import flux_mu

    config, pm = load_config(RECIPE, recipe_paths(kontext_dir, edits_file, clip_dir), pm=plugins())
    assert (config.backbone, config.objective, config.prompt_set, config.rewards) == (
        "flux_kontext", "mixgrpo", "edit", {"edit_clip": 1.0})
    sizes = (config.num_steps, config.group_size, config.prompts_per_iteration, config.num_minibatches)
    assert sizes == (10, 16, 48, 2)
    assert (config.learning_rate, config.ema_decay, config.ema_interval, config.grid) == (3e-4, 0.9, 8, "dynamic")
    assert config.mu == pytest.approx(flux_mu(24 * 24), abs=1e-8)  # the pipeline's grid at 384×384
    bb = pm.create("backbone", config.backbone)
    assert (bb.height, bb.width, bb.source_height, bb.source_width, bb.guidance) == (384, 384, 384, 384, 2.5)
    assert bb.lora_rank == 64 and bb.model_facts().lora_alpha == 128 and bb.dtype == torch.bfloat16
    # the tiny VAE downsamples by 2 (FLUX's by 8, whose 24×24 tokens give the recipe's mu)
    assert bb.vae_scale_factor == 2 and bb.pipeline_mu() == pytest.approx(flux_mu((384 // 4) ** 2))


def test_recipe_runs_as_written(kontext_dir, edits_file, clip_dir, tmp_path):
    """The recipe at tiny sizes: one iteration, on-policy, held-out evaluation of the edits before and after."""
    tiny = ["FluxKontextBackbone.height = 32", "FluxKontextBackbone.width = 32",
            "FluxKontextBackbone.dtype = 'float32'",
            f"FluxKontextBackbone.source_height = {SOURCE[0]}", f"FluxKontextBackbone.source_width = {SOURCE[1]}",
            f"FluxKontextBackbone.max_sequence_length = {TEXT}", "FluxKontextBackbone.lora_rank = 2",
            "TrainConfig.num_steps = 4", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
            "TrainConfig.iterations = 1", "TrainConfig.rollout_batch_size = 2", "TrainConfig.micro_batch_size = 2",
            "TrainConfig.progress = False", "TrainConfig.trackers = []", "TrainConfig.eval_prompts = 2",
            "TrainConfig.eval_seeds = 1", "TrainConfig.sample_prompts = 2", "EditCLIPReward.device = 'cpu'"]
    trainer, rows = train(tmp_path / "run", RECIPE, *recipe_paths(kontext_dir, edits_file, clip_dir), *tiny)
    trained = [r for r in rows if "policy/ratio_mean" in r]
    # the first of the recipe's 2 minibatches recomputes the rollout's own log-probs (the mean ratio also
    # holds the second minibatch's, after an update)
    assert trained[0]["policy/onpolicy_ratio_dev"] < 1e-6
    assert [r["iteration"] for r in rows if "eval/edit_clip/mean" in r] == [0, 1]
    assert all(np.isfinite(r["eval/edit_clip/mean"]) for r in rows if "eval/edit_clip/mean" in r)
    assert (tmp_path / "run" / "checkpoints" / "iter_000001").is_dir()


# -- publishing ----------------------------------------------------------------------------------------
def test_a_lora_export_loads_into_the_pipeline_and_draws_what_we_draw(kontext_dir, edits, tmp_path):
    """A trained LoRA (random adapters), exported for FluxKontextPipeline: the pipeline with it loaded
    draws our images; the model card's snippet passes the source image and keeps the trained size."""
    import ast

    from diffusers import FluxKontextPipeline

    bb = FluxKontextBackbone(str(kontext_dir), source_height=SOURCE[0], source_width=SOURCE[1],
                             max_sequence_length=TEXT, lora_rank=2)
    with torch.no_grad():
        for n, (name, p) in enumerate(bb.module.named_parameters()):
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(n)))
    info = bb.export(tmp_path / "lora")
    assert info["kind"] == "lora" and info["pipeline"] == "FluxKontextPipeline"
    pipe = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora")
    setup = SamplingSetup(num_steps=2, grid="dynamic", mu=bb.pipeline_mu())
    ours = sample_ode(bb, edits[:2], [0, 0], setup=setup, solver=Euler())
    assert max_diff(ours, pipeline_images(pipe, bb, edits[:2], steps=2, cfg=1.0)) < TOL
    snippet = bb.load_snippet(str(tmp_path / "lora"), edits[0], num_steps=28)
    code = "\n".join(snippet[snippet.index("```python") + 1: snippet.index("```", snippet.index("```python") + 1)])
    ast.parse(code)
    assert f"image=load_image({edits[0].image!r}), prompt=\"a red circle\"" in code and "max_area=1024" in code
