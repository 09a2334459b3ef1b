"""The benchmark's pieces: architecture configs, random-weight loading, arguments, the toy path."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from .expected import METHODS, rollout_calls, trained_calls

ROOT = Path(__file__).resolve().parents[2]


def test_configs_are_the_real_architectures(archs):
    flux = archs.load_arch("flux-dev")
    t = flux["transformer"]
    assert (t["num_layers"], t["num_single_layers"]) == (19, 38)
    assert t["num_attention_heads"] * t["attention_head_dim"] == 3072 and t["guidance_embeds"]
    assert sum(t["axes_dims_rope"]) == t["attention_head_dim"]
    assert flux["vae"]["latent_channels"] * 4 == t["in_channels"]
    assert 11.8e9 < archs.count_parameters(flux) < 12.0e9  # FLUX.1-dev's 11.9B
    sd3 = archs.load_arch("sd35-medium")
    assert sd3["transformer"]["dual_attention_layers"] == list(range(13))
    assert sum(sd3["text"]["clip_hidden_sizes"]) == sd3["transformer"]["pooled_projection_dim"]
    assert 2.2e9 < archs.count_parameters(sd3) < 2.3e9
    for arch in (flux, sd3):
        assert "Hugging Face" in arch["_source"] and arch["vae"]["use_quant_conv"] is False
    tiny = archs.load_arch("flux-dev", tiny=True)
    assert archs.count_parameters(tiny) < 1e6 and archs.load_arch("flux-dev")["transformer"]["num_layers"] == 19


def test_unknown_architecture_names_the_known_ones(archs):
    with pytest.raises(ValueError, match="flux-dev, sd35-medium"):
        archs.load_arch("flux-schnell")


def test_random_weights_apply_inside_the_folder_only_and_are_undone(archs, tmp_path):
    from diffusers import FluxTransformer2DModel

    from mixgrpo.plugins.backbones.flux import FluxBackbone

    root = archs.write_model_dir(archs.load_arch("flux-dev", tiny=True), tmp_path / "flux")
    assert not list(root.rglob("*.safetensors"))  # configs and tokenizers only
    with archs.random_weights(root, "cpu", torch.bfloat16):
        backbone = FluxBackbone(str(root), height=32, width=32, dtype="bfloat16", lora_rank=2, device="cpu")
        with pytest.raises(OSError):  # a folder outside the root loads as usual (and has no weights here)
            FluxTransformer2DModel.from_pretrained(tmp_path / "elsewhere")
    assert backbone.config.num_layers == 1 and backbone.vae is not None
    # built directly in the dtype the backbone asked for: the frozen base and the VAE in bf16
    assert {p.dtype for p in backbone.module.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in backbone.vae.parameters()} == {torch.bfloat16}
    assert "from_pretrained" not in FluxTransformer2DModel.__dict__  # the inherited loader is back
    with pytest.raises(OSError):
        FluxTransformer2DModel.from_pretrained(root / "transformer")


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "toy", "--tiny"], "--tiny shrinks the real architectures"),
    (["--backbone", "shapes", "--size", "64"], "--size applies to the real architectures"),
    (["--sweep-group", "0,2"], "values must be >= 1"),
    (["--sweep-steps", "ten"], "comma-separated integers"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--backbone", "toy", "--compile", "all"], "apply to the diffusers backbones"),
    (["--backbone", "toy", "--attention-backend", "native"], "apply to the diffusers backbones"),
    (["--compile", "fast"], "invalid choice: 'fast'"),
    (["--methods", "mixgrpo,grpo"], "unknown method(s) ['grpo']"),
    (["--sweep-window", "0,-1"], "window starts must be >= 0"),
    (["--steps", "10", "--sweep-window", "0,7"], "starts at most at step 6 when T = 10"),
    (["--sweep-method", "dancegrpo", "--sweep-window", "0"], "needs a method whose window moves"),
])
def test_bad_arguments_fail_with_a_clear_message(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device must be cuda or cpu"),
    (["--budget-s", "soon"], "--budget-s must be a whole number"),
    (["--compile-s", "long"], "--compile-s must be a whole number"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_gpu_sh_rejects_bad_arguments(argv, message):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_ratios_are_to_dancegrpo_and_to_the_floor(bench):
    table = {m: {"iteration_s": t, "floor_s": f} for m, t, f in
             [("dancegrpo", 10.0, 8.0), ("mixgrpo", 5.0, 2.0), ("flowgrpo", 15.0, 12.0)]}
    bench.add_ratios(table)
    assert table["mixgrpo"]["ratio_to_dancegrpo"] == 0.5 and table["mixgrpo"]["ratio_to_floor"] == 2.5
    assert table["flowgrpo"]["floor_ratio_to_dancegrpo"] == 1.5 and table["dancegrpo"]["ratio_to_dancegrpo"] == 1.0


def test_methods_and_speed_options_reach_the_run(bench, tmp_path):
    args = bench.parse_args(["--backbone", "shapes", "--methods", "mixgrpo_flash,mixgrpo", "--compile", "rollout",
                             "--attention-backend", "_native_math"])
    assert args.methods == ["mixgrpo", "mixgrpo_flash"]  # the table's order
    run = bench.Run(args, None)
    bindings = run.bindings(str(tmp_path))
    assert "FluxBackbone.compile = 'rollout'" in bindings
    assert "FluxBackbone.attention_backend = '_native_math'" in bindings
    table = {"mixgrpo": {"iteration_s": 2.0, "floor_s": 1.0}}
    bench.add_ratios(table)  # without DanceGRPO: no ratio to it
    assert table["mixgrpo"]["ratio_to_dancegrpo"] is None and table["mixgrpo"]["ratio_to_floor"] == 2.0
    assert table["mixgrpo"]["floor_ratio_to_dancegrpo"] is None


@pytest.mark.parametrize(("method", "schedule", "interval"), [
    ("mixgrpo", "progressive", 25), ("mixgrpo_flash", "progressive", 20), ("mixgrpo_flash_star", "fixed", None),
    ("dancegrpo", "random_subset", None)])
def test_shapes_backbone_times_the_presets_own_window_schedules(bench, tmp_path, method, schedule, interval):
    """The shapes world's file shifts windows every 10 iterations (its 40-iteration demo); the
    benchmark reads the preset again after it, so --at-iteration means what it means on FLUX."""
    import gin

    from mixgrpo.core.config import load_config

    run = bench.Run(bench.parse_args(["--backbone", "shapes", "--no-share-prefix"]), None)
    bindings = run.bindings(str(tmp_path), method=method)
    assert "TrainConfig.share_prefix = False" in bindings
    cfg, _ = load_config(ROOT / "experiments" / "methods" / f"{method}.gin", bindings)
    assert (cfg.schedule, cfg.num_steps, cfg.backbone) == (schedule, 25, "flux")
    if interval is not None:
        assert gin.query_parameter("ProgressiveWindow.shift_interval") == interval
    assert gin.query_parameter("FluxBackbone.path") == "shipped:shapes-flux"  # the world's model


def test_toy_backbone_json(bench, tmp_path):
    out = tmp_path / "toy.json"
    # two rollout chunks of 2 samples, scored in the background: the NFE counts see whole rollouts
    bench.main(["--backbone", "toy", "--steps", "10", "--warmup", "0", "--iterations", "1", "--prompts", "1",
                "--threads", "1", "--sweep-steps", "6,10", "--sweep-group", "4", "--rollout-batch-size", "2",
                "--overlap-rewards", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["settings"]["overlap_rewards"] is True and data["settings"]["rollout_batch_size"] == 2
    for method in METHODS:
        assert data[method]["nfe_rollout"] == pytest.approx(rollout_calls(method, 10, group_size=4))
        assert data[method]["nfe_train"] == pytest.approx(trained_calls(method, 10, group_size=4, groups=1))
        assert data[method]["floor_s"] > 0
        assert data[method]["window_start"] == (-1 if method in ("flowgrpo", "dancegrpo") else 0)
    assert [p["value"] for p in data["sweeps"]["steps"]] == [6, 10]
    # the window axis at T = 10: its default starts that fit (0), which is the table's own window
    assert [(p["value"], p.get("from")) for p in data["sweeps"]["window"]] == [(0, "table")]
    first = data["sweeps"]["steps"][0]
    assert first["nfe_rollout"] == rollout_calls("mixgrpo", 6, group_size=4) and "from" not in first
    assert data["sweeps"]["group_size"][0]["from"] == "table"  # 4 is the run's own group size


def test_window_sweep_times_the_first_iteration_with_each_window(bench, tmp_path):
    """MixGRPO at T = 10 with its window at steps 0, 3 and 6: the shared steps grow with the start
    (groups of 4: steps 0..l once per group), training stays at the window's 4 steps."""
    out = tmp_path / "window.json"
    bench.main(["--backbone", "toy", "--steps", "10", "--warmup", "0", "--iterations", "1", "--prompts", "1",
                "--threads", "1", "--methods", "mixgrpo", "--sweep-steps", "10", "--sweep-group", "4",
                "--sweep-window", "0,3,6", "--json", str(out)])
    points = json.loads(out.read_text())["sweeps"]["window"]
    assert [p["value"] for p in points] == [0, 3, 6] and points[0]["from"] == "table"
    for p in points:  # the preset moves its window every 25 iterations
        assert p["nfe_rollout"] == pytest.approx(rollout_calls("mixgrpo", 10, group_size=4, iteration=25 * p["value"]))
        assert p["nfe_train"] == pytest.approx(trained_calls("mixgrpo", 10, group_size=4, groups=1))
    assert points[2]["nfe_rollout"] == pytest.approx(10 - 7 * 3 / 4)


def test_window_search_finds_the_iteration_or_says_why(bench, tmp_path):
    run = bench.Run(bench.parse_args(["--steps", "10", "--prompts", "1", "--group-size", "2"]), None)
    mix = bench.build_trainer(run, "mixgrpo", str(tmp_path / "m"))
    assert [bench.iteration_with_window(mix, start) for start in (0, 1, 6)] == [0, 25, 150]
    with pytest.raises(ValueError, match="never starts its window at step 7"):
        bench.iteration_with_window(mix, 7, horizon=400)
    dance = bench.build_trainer(run, "dancegrpo", str(tmp_path / "d"))
    with pytest.raises(ValueError, match="has no window"):
        bench.iteration_with_window(dance, 0)
