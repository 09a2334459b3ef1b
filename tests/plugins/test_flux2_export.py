"""``mixgrpo export`` of a FLUX.2-klein run: the LoRA adapter loads with ``Flux2KleinPipeline.load_lora_weights``
and the full weights as a ``Flux2Transformer2DModel`` folder, and the pipeline then samples what the
trained backbone samples from the same noise on the pipeline's own σ grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixgrpo.commands.export import EXPORT_INFO
from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.tiny_flux2 import build_tiny_flux2
from mixgrpo.plugins.samplers.euler import Euler
from tests.export_checks import export, exported_lora_keys, max_diff

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares on the left"]
STEPS = 3
TOL = 2e-5  # float32 rounding; the asserts report the measured differences
LORA = {"rank": 4, "alpha": 6}  # alpha / rank = 1.5: an adapter loaded with the wrong scale would show
TINY = [
    "TrainConfig.num_steps = 4", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
    "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 4", "TrainConfig.iterations = 1",
    "TrainConfig.checkpoint_every = 1", "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
    "TrainConfig.rewards = {'shapes.preference': 1.0}", "ProgressiveWindow.window_size = 2",
    "TrainConfig.backbone = 'flux2'", "Flux2Backbone.max_sequence_length = 64",  # the base model's CFG 4
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/plugins/conftest.py


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    return build_tiny_flux2(tmp_path_factory.mktemp("export") / "flux2")


def train_run(out: Path, flux2_dir: Path, lora: bool) -> Trainer:
    """One MixGRPO iteration into the run directory ``out``; the trainer keeps the trained backbone."""
    bindings = ([f"Flux2Backbone.lora_rank = {LORA['rank']}", f"Flux2Backbone.lora_alpha = {LORA['alpha']}",
                 "TrainConfig.learning_rate = 3e-2"] if lora else ["TrainConfig.learning_rate = 1e-3"])
    config, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin",
                             [*TINY, f"Flux2Backbone.path = '{flux2_dir}'", f"TrainConfig.output_dir = '{out}'",
                              *bindings])
    trainer = Trainer(config, pm)
    trainer.train()
    trainer.backbone.module.eval()
    return trainer


def ours(backbone) -> torch.Tensor:
    setup = SamplingSetup(num_steps=STEPS, grid="dynamic", mu=backbone.pipeline_mu(STEPS))
    return sample_ode(backbone, PROMPTS, [0] * len(PROMPTS), setup=setup, solver=Euler())


def pipeline_images(pipe, backbone) -> torch.Tensor:
    """The pipeline's images from the noise ``sample_ode`` draws, on the pipeline's own grid."""
    x = torch.stack([keyed_normal(backbone.latent_shape(), 0, "eval", n) for n in range(len(PROMPTS))])
    with torch.no_grad():
        return pipe(prompt=PROMPTS, latents=x, height=backbone.height, width=backbone.width,
                    num_inference_steps=STEPS, guidance_scale=backbone.cfg_scale,
                    max_sequence_length=backbone.max_sequence_length, output_type="pt").images


def test_lora_export_loads_into_flux2_klein_pipeline(tmp_path, capsys, flux2_dir):
    from diffusers import Flux2KleinPipeline

    trainer = train_run(tmp_path / "run", flux2_dir, lora=True)
    out = export(capsys, tmp_path / "run", tmp_path / "lora")
    assert "Flux2KleinPipeline" in out and "load_lora_weights" in out
    keys = exported_lora_keys(tmp_path / "lora", trainer.backbone, LORA["alpha"])  # diffusers' key format
    assert any(".single_transformer_blocks." in k and "to_qkv_mlp_proj" in k for k in keys)
    info = json.loads((tmp_path / "lora" / EXPORT_INFO).read_text())
    assert (info["kind"], info["pipeline"], info["lora_alpha"]) == ("lora", "Flux2KleinPipeline", LORA["alpha"])

    pipe = Flux2KleinPipeline.from_pretrained(flux2_dir, local_files_only=True)
    base = pipeline_images(pipe, trainer.backbone)
    pipe.load_lora_weights(tmp_path / "lora")  # diffusers' own loader
    exported = pipeline_images(pipe, trainer.backbone)
    trained_images = ours(trainer.backbone)
    assert max_diff(exported, trained_images) < TOL, max_diff(exported, trained_images)
    # training moved the images far more than the tolerance, so a lost or wrongly scaled adapter would fail
    assert max_diff(base, trained_images) > 50 * TOL, max_diff(base, trained_images)
    snippet = "\n".join(trainer.backbone.load_snippet("exported/run", PROMPTS[0], STEPS))
    assert "Flux2KleinPipeline.from_pretrained" in snippet and "load_lora_weights(\"exported/run\")" in snippet
    assert "guidance_scale=4.0" in snippet


def test_full_export_is_a_transformer_folder_the_pipeline_loads(tmp_path, capsys, flux2_dir):
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    trainer = train_run(tmp_path / "run", flux2_dir, lora=False)
    export(capsys, tmp_path / "run", tmp_path / "full", "--max-shard-size", "100KB")
    files = sorted(p.name for p in (tmp_path / "full").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "config.json" in files and len(shards) > 1, files  # sharded as asked, safetensors only
    assert json.loads((tmp_path / "full" / "config.json").read_text())["_class_name"] == "Flux2Transformer2DModel"

    transformer = Flux2Transformer2DModel.from_pretrained(tmp_path / "full")
    pipe = Flux2KleinPipeline.from_pretrained(flux2_dir, transformer=transformer, local_files_only=True)
    exported = pipeline_images(pipe, trainer.backbone)
    base = pipeline_images(Flux2KleinPipeline.from_pretrained(flux2_dir, local_files_only=True), trainer.backbone)
    trained_images = ours(trainer.backbone)
    assert max_diff(exported, trained_images) < TOL, max_diff(exported, trained_images)
    assert max_diff(base, trained_images) > 50 * TOL, max_diff(base, trained_images)
