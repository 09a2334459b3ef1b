"""``mixgrpo export``: a trained run's weights, loaded by diffusers' own loaders into diffusers' own
pipelines (``FluxPipeline``, ``StableDiffusion3Pipeline``) or models, sample what the trained backbone
samples with the same noise and σ grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mixgrpo.commands.cli import main
from mixgrpo.commands.export import EXPORT_INFO, open_model
from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import SamplingSetup, keyed_normal, sample_ode
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.diffusers_export import LORA_WEIGHTS, lora_layers
from mixgrpo.plugins.backbones.tiny import build_tiny_flux, build_tiny_sd3
from mixgrpo.plugins.samplers.euler import Euler
from tests.export_checks import exported_lora_keys, max_diff

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares on the left"]
STEPS = 4
SEED = 0
# One MixGRPO iteration, small enough for about a second on a CPU.
TINY = [
    f"TrainConfig.num_steps = {STEPS}",
    "TrainConfig.shift = 3.0",
    "TrainConfig.group_size = 2",
    "TrainConfig.prompts_per_iteration = 2",
    "TrainConfig.rollout_batch_size = 4",
    "TrainConfig.micro_batch_size = 4",
    "TrainConfig.iterations = 1",
    "TrainConfig.checkpoint_every = 1",
    "TrainConfig.progress = False",
    "TrainConfig.tensorboard = False",
    "TrainConfig.rewards = {'shapes.preference': 1.0}",
    f"TrainConfig.seed = {SEED}",
    "ProgressiveWindow.window_size = 2",
]
LORA = {"rank": 4, "alpha": 6}  # alpha / rank = 1.5: an adapter loaded with the wrong scale would show
TOL = 2e-5  # float32 rounding; measured differences are reported by the asserts


# -- tiny models and runs --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """A tiny FLUX.1 layout: CLIP + T5 + VAE, what FluxPipeline needs."""
    return build_tiny_flux(tmp_path_factory.mktemp("export") / "flux", with_vae=True, with_t5=True, t5_dim=48,
                           num_single_layers=1)


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("export") / "sd3")


def backbone_bindings(family: str, model_dir: Path | None, lora: bool) -> list[str]:
    if family == "shapes":
        bindings = ["TrainConfig.backbone = 'flux'", "FluxBackbone.path = 'shipped:shapes-flux'"]
        cls = "FluxBackbone"
    elif family == "flux":
        bindings = ["TrainConfig.backbone = 'flux'", f"FluxBackbone.path = '{model_dir}'"]
        cls = "FluxBackbone"
    else:
        bindings = ["TrainConfig.backbone = 'sd3'", f"SD3Backbone.path = '{model_dir}'",
                    "SD3Backbone.max_sequence_length = 12"]  # CFG 4.5, the SD3 default
        cls = "SD3Backbone"
    if lora:
        bindings += [f"{cls}.lora_rank = {LORA['rank']}", f"{cls}.lora_alpha = {LORA['alpha']}",
                     "TrainConfig.learning_rate = 3e-2"]
    else:
        bindings += ["TrainConfig.learning_rate = 1e-3"]
    return bindings


def train_run(out: Path, family: str, model_dir: Path | None, lora: bool, *extra: str) -> Trainer:
    """Train one iteration into the run directory ``out``; the trainer keeps the trained backbone."""
    config, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin",
                             [*TINY, *backbone_bindings(family, model_dir, lora), f"TrainConfig.output_dir = '{out}'",
                              *extra])
    trainer = Trainer(config, pm)
    trainer.train()
    trainer.backbone.module.eval()
    return trainer


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def noise(backbone, n_prompts: int, seed: int = SEED) -> torch.Tensor:
    """The initial noise ``sample_ode`` draws for prompts 0..n-1 with ``seed`` (unpacked latents)."""
    return torch.stack([keyed_normal(backbone.latent_shape(), seed, "eval", n) for n in range(n_prompts)])


def ours(backbone, prompts=PROMPTS, seed=SEED, steps=STEPS, shift=3.0) -> torch.Tensor:
    return sample_ode(backbone, prompts, [seed] * len(prompts), setup=SamplingSetup(num_steps=steps, shift=shift),
                      solver=Euler())


def pipeline_sigmas(steps=STEPS, shift=3.0) -> list[float]:
    """The backbone's σ grid without its final 0 (diffusers' schedulers append it)."""
    return SamplingSetup(num_steps=steps, shift=shift).sigmas(None)[:-1].tolist()


def unshifted_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # takes the σ given as they are


def flux_pipeline(root: Path, transformer=None):
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    return FluxPipeline(
        scheduler=unshifted_scheduler(), vae=AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(root / "text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(root / "tokenizer_2"),
        transformer=transformer or FluxTransformer2DModel.from_pretrained(root / "transformer"))


def sd3_pipeline(root: Path, transformer=None):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    return StableDiffusion3Pipeline(
        scheduler=unshifted_scheduler(), vae=AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(root / "tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(root / "text_encoder_3"),
        tokenizer_3=AutoTokenizer.from_pretrained(root / "tokenizer_3"),
        transformer=transformer or SD3Transformer2DModel.from_pretrained(root / "transformer"))


def pipeline_images(family: str, pipe, backbone, prompts=PROMPTS, seed=SEED, steps=STEPS, shift=3.0,
                    guidance: float | None = None) -> torch.Tensor:
    """The diffusers pipeline's images ``[N, 3, H, W]`` in [0, 1] from the backbone's noise and grid."""
    from diffusers import FluxPipeline

    x = noise(backbone, len(prompts), seed)
    c, h, w = backbone.latent_shape()
    common = {"height": backbone.height, "width": backbone.width, "num_inference_steps": steps,
              "sigmas": pipeline_sigmas(steps, shift), "output_type": "pt"}
    with torch.no_grad():
        if family == "flux":
            return pipe(prompts, latents=FluxPipeline._pack_latents(x, len(prompts), c, h, w),
                        max_sequence_length=backbone.max_sequence_length, **common).images
        return pipe(prompts, latents=x, guidance_scale=backbone.cfg_scale if guidance is None else guidance,
                    max_sequence_length=backbone.max_sequence_length, **common).images


# -- the pipelines sample what the trained backbone samples ----------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_lora_export_loads_into_the_diffusers_pipeline(tmp_path, capsys, family, flux_dir, sd3_dir):
    root = flux_dir if family == "flux" else sd3_dir
    trainer = train_run(tmp_path / "run", family, root, lora=True)
    rc, out, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "lora")
    assert rc == 0, err
    assert "load_lora_weights" in out

    exported_lora_keys(tmp_path / "lora", trainer.backbone, LORA["alpha"])  # diffusers' key format
    info = json.loads((tmp_path / "lora" / EXPORT_INFO).read_text())
    assert (info["kind"], info["iteration"], info["lora_alpha"]) == ("lora", 1, LORA["alpha"])

    make = flux_pipeline if family == "flux" else sd3_pipeline
    pipe = make(root)
    base = pipeline_images(family, pipe, trainer.backbone)
    pipe.load_lora_weights(tmp_path / "lora")  # diffusers' own loader
    exported = pipeline_images(family, pipe, trainer.backbone)
    trained = ours(trainer.backbone)
    assert max_diff(exported, trained) < TOL, max_diff(exported, trained)
    # training moved the images far more than the tolerance, so a lost or wrong alpha would fail
    assert max_diff(base, trained) > 50 * TOL, max_diff(base, trained)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_full_export_is_a_transformer_folder_from_pretrained_loads(tmp_path, capsys, family, flux_dir, sd3_dir):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    root = flux_dir if family == "flux" else sd3_dir
    trainer = train_run(tmp_path / "run", family, root, lora=False)
    rc, out, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "full", "--max-shard-size", "200KB")
    assert rc == 0, err
    files = sorted(p.name for p in (tmp_path / "full").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "config.json" in files and len(shards) > 1, files  # sharded as asked, safetensors only
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert not any(f.endswith((".bin", ".pt")) for f in files)

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    transformer = cls.from_pretrained(tmp_path / "full")
    make = flux_pipeline if family == "flux" else sd3_pipeline
    exported = pipeline_images(family, make(root, transformer), trainer.backbone)
    base = pipeline_images(family, make(root), trainer.backbone)
    trained = ours(trainer.backbone)
    assert max_diff(exported, trained) < TOL, max_diff(exported, trained)
    assert max_diff(base, trained) > 50 * TOL, max_diff(base, trained)


def hand_pack(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, (H/p)(W/p), C·p·p]``: patches row-major, channel-major inside."""
    b, c, h, w = x.shape
    return x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, (h // p) * (w // p), c * p * p)


def hand_unpack(tokens: torch.Tensor, c: int, h: int, w: int, p: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def diffusers_euler_samples(transformer, backbone, prompts=PROMPTS, seed=SEED) -> torch.Tensor:
    """A diffusers transformer stepped by diffusers' FlowMatchEulerDiscreteScheduler in pixel space."""
    p = backbone.patch
    c, h, w = backbone.latent_shape()
    cond = backbone.encode(prompts)  # the frozen text encoder is not part of the export
    ids = torch.tensor([[0.0, i, j] for i in range(h // p) for j in range(w // p)])
    scheduler = unshifted_scheduler()
    scheduler.set_timesteps(sigmas=pipeline_sigmas())
    latents = hand_pack(noise(backbone, len(prompts), seed), p)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = transformer(hidden_states=latents, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                            timestep=(t / 1000).expand(len(prompts)), img_ids=ids,
                            txt_ids=torch.zeros(cond.embeds.shape[1], 3), return_dict=False)[0]
            latents = scheduler.step(v, t, latents).prev_sample
    return ((hand_unpack(latents, c, h, w, p) + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_shapes_world_model_exports_the_same_way(tmp_path, capsys, lora):
    """The shipped pixel-space model has no VAE, so no pipeline: diffusers' model loaders and its
    Euler scheduler against the trained backbone's velocity and samples."""
    from diffusers import FluxTransformer2DModel

    from mixgrpo.plugins.backbones import resolve_model_path

    trainer = train_run(tmp_path / "run", "shapes", None, lora)
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "out")
    assert rc == 0, err
    base_dir = resolve_model_path("shipped:shapes-flux") / "transformer"
    if lora:
        transformer = FluxTransformer2DModel.from_pretrained(base_dir)
        transformer.load_lora_adapter(tmp_path / "out", weight_name=LORA_WEIGHTS, prefix="transformer")
    else:
        transformer = FluxTransformer2DModel.from_pretrained(tmp_path / "out")
    transformer.eval()

    bb = trainer.backbone
    cond = bb.encode(PROMPTS)
    x, sigma = noise(bb, 2), torch.tensor([0.9, 0.35])
    p, (c, h, w) = bb.patch, bb.latent_shape()
    ids = torch.tensor([[0.0, i, j] for i in range(h // p) for j in range(w // p)])
    with torch.no_grad():
        v_diffusers = hand_unpack(transformer(
            hidden_states=hand_pack(x, p), encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
            timestep=sigma, img_ids=ids, txt_ids=torch.zeros(cond.embeds.shape[1], 3), return_dict=False)[0],
            c, h, w, p)
        v_trained = bb.velocity(x, sigma, cond)
    assert max_diff(v_diffusers, v_trained) < TOL, max_diff(v_diffusers, v_trained)

    exported = diffusers_euler_samples(transformer, bb)
    trained = ours(bb)
    base = diffusers_euler_samples(FluxTransformer2DModel.from_pretrained(base_dir).eval(), bb)
    assert max_diff(exported, trained) < TOL, max_diff(exported, trained)
    assert max_diff(base, trained) > 50 * TOL, max_diff(base, trained)


def test_baked_alpha_adapter_loads_without_metadata(tmp_path, flux_dir):
    """For diffusers versions that cannot store the LoRA config, alpha/r is multiplied into lora_B:
    diffusers then assumes alpha = r and must load the same adapter."""
    from diffusers import FluxPipeline

    trainer = train_run(tmp_path / "run", "flux", flux_dir, lora=True)
    state, metadata = lora_layers(trainer.backbone.unwrapped(), bake_alpha=True)
    assert metadata["lora_alpha"] == LORA["rank"]
    FluxPipeline.save_lora_weights(tmp_path / "baked", transformer_lora_layers=state)  # no metadata
    pipe = flux_pipeline(flux_dir)
    pipe.load_lora_weights(tmp_path / "baked")
    exported = pipeline_images("flux", pipe, trainer.backbone)
    assert max_diff(exported, ours(trainer.backbone)) < TOL


def test_open_model_loads_the_checkpoint_the_trainer_wrote(tmp_path, flux_dir):
    trainer = train_run(tmp_path / "run", "flux", flux_dir, True, "TrainConfig.iterations = 2")
    opened = open_model(tmp_path / "run")
    assert opened.iteration == 2 and opened.checkpoint.name == "iter_000002"
    for (name, a), (_, b) in zip(trainer.backbone.unwrapped().state_dict().items(),
                                 opened.backbone.unwrapped().state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    first = open_model(tmp_path / "run", checkpoint="1")
    assert first.iteration == 1
    assert max_diff(ours(first.backbone), ours(opened.backbone)) > 0  # the second iteration changed it


# -- errors ----------------------------------------------------------------------------------------
def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    """Exit status 2 and one line ``mixgrpo <command>: error: ...``, the last on stderr (above it only
    the loaders' progress bars), and no traceback."""
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mixgrpo ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_exporting_a_run_without_checkpoints_is_a_clear_error(tmp_path, capsys, flux_dir):
    train_run(tmp_path / "run", "flux", flux_dir, True, "TrainConfig.checkpoint_every = 0")
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # every finished run keeps its last: one that stopped before
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "out")
    assert_one_line_error(rc, err, "has no checkpoint", "checkpoint_every")
    assert "--checkpoint base" not in err  # the base model is not an export
    assert not (tmp_path / "out").exists()
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "out", "--checkpoint", "base")
    assert_one_line_error(rc, err, "nothing to export")
    rc, _, err = run_cli(capsys, "export", tmp_path / "missing", "--to", tmp_path / "out")
    assert_one_line_error(rc, err, "not a run directory")
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "out", "--checkpoint", "7")
    assert_one_line_error(rc, err, "checkpoint '7' not found")


def test_a_checkpoint_of_another_backbone_family_is_a_clear_error(tmp_path, capsys, flux_dir, sd3_dir):
    train_run(tmp_path / "flux_run", "flux", flux_dir, lora=True)
    train_run(tmp_path / "sd3_run", "sd3", sd3_dir, lora=True)
    sd3_checkpoint = tmp_path / "sd3_run" / "checkpoints" / "iter_000001"
    rc, _, err = run_cli(capsys, "export", tmp_path / "flux_run", "--to", tmp_path / "out",
                         "--checkpoint", sd3_checkpoint)
    assert_one_line_error(rc, err, "'sd3' run", "'flux' run")
    # the same checkpoint away from its run: the weights themselves do not fit
    shutil.copytree(sd3_checkpoint, tmp_path / "loose" / "iter_000001")
    rc, _, err = run_cli(capsys, "export", tmp_path / "flux_run", "--to", tmp_path / "out",
                         "--checkpoint", tmp_path / "loose" / "iter_000001")
    assert_one_line_error(rc, err, "does not fit the FluxBackbone")
    # same family, but full fine-tuning where the checkpoint holds a LoRA run
    rc, _, err = run_cli(capsys, "export", tmp_path / "flux_run", "--to", tmp_path / "out",
                         "--gin", "FluxBackbone.lora_rank = 0")
    assert_one_line_error(rc, err, "does not fit", "lora_rank")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_is_kept_unless_forced(tmp_path, capsys, flux_dir):
    train_run(tmp_path / "run", "flux", flux_dir, lora=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", out)
    assert_one_line_error(rc, err, "not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", out, "--force")
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # --force writes into the folder, never empties it
    assert (out / LORA_WEIGHTS).is_file() and (out / EXPORT_INFO).is_file()
    assert not list(tmp_path.glob(".out.partial*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, "export", tmp_path / "run", "--to", empty)[0] == 0  # an empty folder is fine


def test_a_toy_run_has_nothing_to_export(tmp_path, capsys):
    config, pm = load_config(ROOT / "experiments" / "runs" / "toy_smoke.gin",
                             ["TrainConfig.iterations = 1", "TrainConfig.checkpoint_every = 1",
                              "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
                              f"TrainConfig.output_dir = '{tmp_path / 'run'}'"])
    Trainer(config, pm).train()
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "out")
    assert_one_line_error(rc, err, "does not name one")
    assert not (tmp_path / "out").exists()
