"""The speed options of the diffusers backbones (docs/benchmarks.md, "Speed options"): diffusers'
attention backends, torch.compile, bf16 autocast, batched rollout and the unmerged LoRA, each taken
from gin, refused with a clear message where it cannot run, and with every one of them on the
rollout and training still compute the same log-probs (the run's own ``policy/onpolicy_ratio_dev``).

The models are the smallest tiny FLUX that still has both kinds of blocks (one double, one single,
8×8 pixels), so that the compiled run stays short on a CPU: torch.compile's time is mostly inductor
generating and compiling C++ kernels, about the same for any width. Measured on a 2-core AMD EPYC
(load 1.5–2): 37 s for the every-option run and 39 s for the SD3 one with inductor's cache empty,
5 s and 4 s once it holds their kernels (92 s for the first under load 7).
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from mixgrpo.core.config import load_config
from mixgrpo.core.rollout import rollout
from mixgrpo.core.trainer import Trainer
from mixgrpo.plugins.backbones.diffusers_base import attention_backends
from mixgrpo.plugins.backbones.flux import FluxBackbone
from mixgrpo.plugins.backbones.sd3 import SD3Backbone
from mixgrpo.plugins.backbones.tiny import build_tiny_flux, build_tiny_sd3

from ..core.conftest import ROOT

SMALL = [
    "TrainConfig.num_steps = 3", "TrainConfig.group_size = 2", "TrainConfig.prompts_per_iteration = 2",
    "TrainConfig.rollout_batch_size = 4", "TrainConfig.micro_batch_size = 4", "TrainConfig.iterations = 1",
    "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
    "TrainConfig.rewards = {'shapes.preference': 1.0}", "TrainConfig.learning_rate = 1e-3",
    "ProgressiveWindow.window_size = 2",
]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("speed") / "flux", num_layers=1, num_single_layers=1,
                           attention_head_dim=16, num_attention_heads=2, image_size=8, text_dim=32)


def make_trainer(tmp_path, flux_dir, *bindings: str) -> Trainer:
    cfg, pm = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin",
                          [*SMALL, "TrainConfig.backbone = 'flux'", f"FluxBackbone.path = '{flux_dir}'",
                           f"TrainConfig.output_dir = '{tmp_path / 'run'}'", *bindings])
    return Trainer(cfg, pm)


def inputs(bb, n: int = 4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *bb.latent_shape(), generator=gen)
    sigma = torch.linspace(0.9, 0.2, n)
    cond = bb.encode(["a red circle", "two blue squares", "a green star", "one yellow ring"][:n])
    return x, sigma, cond


def processor_backends(bb) -> set:
    return {getattr(m.processor, "_attention_backend", "absent") for m in bb.unwrapped().modules()
            if hasattr(m, "processor") and m.processor is not None}


# -- each option from gin ------------------------------------------------------------------------------
def test_options_are_taken_from_gin_and_the_backend_is_this_transformers_alone(tmp_path, flux_dir):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    trainer = make_trainer(tmp_path, flux_dir, "FluxBackbone.attention_backend = '_native_math'",
                           "FluxBackbone.compile = 'rollout'", "FluxBackbone.lora_rank = 4")
    bb = trainer.backbone
    assert (bb.attention_backend, bb.compile, bb.lora_rank) == ("_native_math", "rollout", 4)
    assert processor_backends(bb) == {"_native_math"}
    # diffusers' set_attention_backend also sets the process-wide default; other models keep theirs
    assert _AttentionBackendRegistry._active_backend == before
    assert processor_backends(FluxBackbone(str(flux_dir))) == {None}
    trainer = make_trainer(tmp_path, flux_dir, "FluxBackbone.compile = 'all'", "FluxBackbone.dtype = 'bfloat16'")
    assert (trainer.backbone.compile, trainer.backbone.dtype) == ("all", torch.bfloat16)


def test_an_attention_backend_computes_the_same_velocity_by_another_kernel(flux_dir):
    """PyTorch's math kernel against SDPA's default (CPU flash) kernel: not bit-equal, so the option
    took effect, and equal to fp32 rounding (|v| is about 2)."""
    off, on = FluxBackbone(str(flux_dir)), FluxBackbone(str(flux_dir), attention_backend="_native_math")
    x, sigma, cond = inputs(off)
    with torch.no_grad():
        v_off, v_on = off.velocity(x, sigma, cond), on.velocity(x, sigma, cond)
    assert not torch.equal(v_off, v_on)
    torch.testing.assert_close(v_on, v_off, rtol=0, atol=1e-5)


# -- refused with a clear message, before anything is loaded --------------------------------------------
@pytest.mark.parametrize(("name", "message"), [
    ("nope", "unknown attention_backend 'nope'; diffusers' attention backends are .*xformers"),
    ("flash_hub", "downloads its kernel from the Hugging Face Hub"),
    ("_native_cudnn", "runs on CUDA only"),
    ("xformers", "xformers"),
    ("flash", "flash-attn"),
])
def test_a_backend_that_cannot_run_here_is_refused_before_loading(tmp_path, name, message):
    available = attention_backends(torch.device("cpu"))
    assert {"native", "_native_math"} <= set(available)
    installed = {"xformers": "xformers", "flash": "flash_attn"}
    if name in installed and importlib.util.find_spec(installed[name]) is not None:  # a machine that has it
        assert name in available or torch.cuda.is_available() is False
        return
    # the folder does not exist: the backend is refused before the path is even looked at
    with pytest.raises(ValueError, match=message) as err:
        FluxBackbone(str(tmp_path / "missing"), attention_backend=name, device="cpu")
    if name != "nope":
        assert f"Available on cpu: {', '.join(available)}" in str(err.value)


def test_compile_modes_are_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match="compile must be one of none, rollout, all"):
        FluxBackbone(str(tmp_path / "missing"), compile="yes")
    with pytest.raises(ValueError, match="compile='rollout' with dtype bfloat16.*Use compile='all'"):
        FluxBackbone(str(tmp_path / "missing"), compile="rollout", dtype="bfloat16")


def test_sd3_refuses_a_backend_its_attention_never_dispatches_to(tmp_path):
    root = build_tiny_sd3(tmp_path / "sd3")
    with pytest.raises(ValueError, match="JointAttnProcessor2_0.*call PyTorch SDPA directly"):
        SD3Backbone(str(root), attention_backend="_native_math", max_sequence_length=12)


def test_sd3_compiles_its_joint_blocks_and_rollout_equals_training(tmp_path):
    """SD3 in diffusers 0.42 names no repeated blocks; the backbone compiles its JointTransformerBlocks.
    fp32: the compiled velocity equals eager to 1e-6 (|v| ≈ 2), and the compiled rollout (no grad)
    equals the compiled training forward bit for bit."""
    root = build_tiny_sd3(tmp_path / "sd3")
    off = SD3Backbone(str(root), max_sequence_length=12, cfg_scale=1.0)
    on = SD3Backbone(str(root), max_sequence_length=12, cfg_scale=1.0, compile="all")
    x, sigma, cond = inputs(off, 2)
    with torch.no_grad():
        v_off, v_rollout = off.velocity(x, sigma, cond), on.velocity(x, sigma, cond)
    (blocks,) = [compiled for _, compiled in on._compiled.values()]
    assert [type(b).__name__ for b, _ in blocks] == ["JointTransformerBlock"] * 2
    torch.testing.assert_close(v_rollout, v_off, rtol=0, atol=1e-6)
    v_train = on.velocity(x, sigma, cond)
    v_train.square().mean().backward()
    assert torch.equal(v_train.detach(), v_rollout)


# -- batched rollout ----------------------------------------------------------------------------------
def test_a_whole_group_rolls_out_in_one_call_and_batching_changes_nothing(tmp_path, flux_dir):
    """rollout_batch_size >= the samples: one transformer call per step for all groups together;
    smaller batches split the samples into chunks (never by group: rows in order) and give the same
    trajectories. The first step, whose input a group's samples share (shared noise), runs once per
    group before the chunks: 2 groups in batches of ``batch`` groups."""
    trainer = make_trainer(tmp_path, flux_dir)
    bb, c = trainer.backbone, trainer.config
    calls = []
    hook = bb.module.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]),
                                               with_kwargs=True)
    prompts, group_ids, sample_ids = trainer.local_batch(0)
    plan = trainer.schedule.plan(0, c.num_steps, len(prompts), seed=c.seed)
    runs = {}
    for batch in (4, 3, 1):
        calls.clear()
        runs[batch] = rollout(bb, prompts, group_ids, sample_ids, plan, setup=trainer.setup,
                              sde_sampler=trainer.sde_sampler, pre_solver=trainer.pre_solver,
                              post_solver=trainer.post_solver, seed=c.seed, iteration=0, batch_size=batch)
        # the shared step once per group, then chunk by chunk: a chunk of `batch` samples walks the
        # other 2 steps before the next one starts
        assert calls == {4: [2, 4, 4], 3: [2, 3, 3, 1, 1], 1: [1] * 10}[batch]
    hook.remove()
    for batch in (3, 1):
        torch.testing.assert_close(runs[batch].log_prob, runs[4].log_prob, rtol=0, atol=1e-5)
        torch.testing.assert_close(runs[batch].latents, runs[4].latents, rtol=0, atol=1e-5)


# -- every option on ---------------------------------------------------------------------------------
def test_every_option_on_keeps_rollout_and_training_on_policy(tmp_path, flux_dir):
    """bf16 autocast, torch.compile of rollout and training, PyTorch's math attention kernel, the
    unmerged LoRA and the whole iteration in one rollout batch: the first minibatch's ratios are 1 to
    within 1e-6 (measured: exactly 1), and the velocities equal those with every option off (eager,
    SDPA, same bf16 weights) to bf16 rounding: 0.03 at |v| ≈ 2, a few bf16 ulps."""
    bindings = ["FluxBackbone.dtype = 'bfloat16'", "FluxBackbone.lora_rank = 4"]
    off = FluxBackbone(str(flux_dir), dtype="bfloat16", lora_rank=4)
    trainer = make_trainer(tmp_path, flux_dir, *bindings, "FluxBackbone.compile = 'all'",
                           "FluxBackbone.attention_backend = '_native_math'")
    on = trainer.backbone
    x, sigma, cond = inputs(on)  # the rollout's batch of 4: the compiled graph the rollout uses
    start = time.perf_counter()
    with torch.no_grad():
        v_on, v_off = on.velocity(x, sigma, cond), off.velocity(x, sigma, cond)
    torch.testing.assert_close(v_on, v_off, rtol=0, atol=0.03)
    rows = trainer.train()
    print(f"compiled run: {time.perf_counter() - start:.1f} s")
    assert len(rows) == 1
    assert rows[0]["policy/onpolicy_ratio_dev"] <= 1e-6
    assert rows[0]["policy/grad_norm"] > 0  # the compiled backward reached the adapters
