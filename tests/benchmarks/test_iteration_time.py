"""The benchmark's pieces: architecture configs, random-weight loading, arguments, the toy path."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from .expected import METHODS, PAPER_METHODS, rollout_calls, trained_calls, trained_calls_without_grad

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


# The newer architectures: transformer parameters (the models' published sizes: Qwen-Image 20B, FLUX.2
# klein 4B, Z-Image 6B, SD3.5-Large 8.1B) and the text width each transformer reads.
NEWER = {
    "qwen-image": ((20.3e9, 20.5e9), lambda t, x: t["joint_attention_dim"] == x["hidden_size"] == 3584),
    "flux2-klein": ((3.8e9, 4.0e9),
                    lambda t, x: t["joint_attention_dim"] == 3 * x["qwen3_hidden_size"] == 7680),
    "z-image": ((6.1e9, 6.2e9), lambda t, x: t["cap_feat_dim"] == x["qwen3_hidden_size"] == 2560),
    "sd35-large": ((8.0e9, 8.1e9), lambda t, x: t["pooled_projection_dim"] == sum(x["clip_hidden_sizes"])),
}


@pytest.mark.parametrize("name", list(NEWER))
def test_newer_configs_have_their_models_sizes_and_shrink_for_the_dry_run(archs, name):
    (low, high), text_fits = NEWER[name]
    arch = archs.load_arch(name)
    assert low < archs.count_parameters(arch) < high
    model = {"qwen-image": "Qwen-Image", "flux2-klein": "FLUX.2-klein-4B", "z-image": "Z-Image",
             "sd35-large": "Stable Diffusion 3.5 Large"}[name]
    assert text_fits(arch["transformer"], arch["text"]) and arch["_source"].startswith(model)  # names its source
    tiny = archs.load_arch(name, tiny=True)
    assert archs.count_parameters(tiny) < 1e6 and tiny["backbone"] == arch["backbone"]
    assert tiny["text"]["max_sequence_length"] >= 8  # the dry run binds it (the real one: the gin file's)


@pytest.mark.parametrize(("name", "cls_path"), [
    ("qwen-image", "mixgrpo.plugins.backbones.qwenimage:QwenImageBackbone"),
    ("flux2-klein", "mixgrpo.plugins.backbones.flux2:Flux2Backbone"),
    ("z-image", "mixgrpo.plugins.backbones.zimage:ZImageBackbone"),
    ("sd35-large", "mixgrpo.plugins.backbones.sd3:SD3Backbone"),
])
def test_real_size_folders_pass_the_backbones_own_load_checks(archs, tmp_path, name, cls_path):
    """At real size on the meta device (no memory, no time): the folder's transformer, VAE and
    stand-in text encoder agree with each other as the backbone checks them (text width, latent
    channels, patching, RoPE positions), LoRA attaches, and the text encoders are one layer deep."""
    import importlib

    module, cls_name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    arch = archs.load_arch(name)
    root = archs.write_model_dir(arch, tmp_path / name)
    kwargs = {"text_encoder_out_layers": (1, 1, 1), "cfg_scale": 4.0} if name == "flux2-klein" else {}
    size = archs.DEFAULT_SIZE[name]
    with archs.random_weights(root, "meta", torch.bfloat16):
        backbone = cls(str(root), height=size, width=size, dtype="bfloat16", lora_rank=4, device="meta", **kwargs)
    # the base is the whole transformer, LoRA adds the only trainable parameters
    named = list(backbone.unwrapped().named_parameters())
    assert sum(p.numel() for n, p in named if "lora_" not in n) == archs.count_parameters(arch)
    assert backbone.trainable_parameters() and all("lora_" in n for n, p in named if p.requires_grad)
    encoders = [m for m in backbone.frozen.values() if hasattr(m.config, "get_text_config")]  # not the VAE
    assert encoders and all(m.config.get_text_config().num_hidden_layers == 1 for m in encoders)
    side = size // 8  # every family's VAE downsamples 8x
    assert backbone.latent_shape()[-2:] == ((side, side) if name != "flux2-klein" else (side // 2, side // 2))


def test_unknown_architecture_names_the_known_ones(archs):
    with pytest.raises(ValueError, match="flux-dev, flux2-klein, qwen-image, sd35-large, sd35-medium, z-image"):
        archs.load_arch("flux-schnell")
    with pytest.raises(ValueError, match="kind 'dalle' .*; known: flux, flux2, qwenimage, sd3, zimage"):
        archs.write_model_dir({"backbone": "dalle"}, "/nonexistent/never-written")


@pytest.mark.parametrize(("name", "plugin", "gin_file", "guidance"), [
    ("sd35-large", "sd3", "sd35_large.gin", ("SD3Backbone.cfg_scale", 3.5)),
    ("qwen-image", "qwenimage", "qwenimage.gin", ("QwenImageBackbone.cfg_scale", 4.0)),
    ("flux2-klein", "flux2", "flux2_klein.gin", ("Flux2Backbone.cfg_scale", 4.0)),
    ("z-image", "zimage", "zimage.gin", ("ZImageBackbone.guidance_scale", 4.0)),
])
def test_newer_backbones_take_their_own_gin_files_and_benchmark_settings(bench, archs, tmp_path, name, plugin,
                                                                         gin_file, guidance):
    """Each real architecture runs through its family's gin file (its guidance, dtypes, lengths), with
    the benchmark's size, LoRA rank and model folder on top."""
    import gin

    from mixgrpo.core.config import load_config

    run = bench.Run(bench.parse_args(["--backbone", name, "--device", "cpu"]), tmp_path)
    bindings = run.bindings(str(tmp_path / "out"), method="mixgrpo")
    assert f"include '{ROOT / 'experiments/backbones' / gin_file}'" in bindings
    cfg, _ = load_config(ROOT / "experiments" / "methods" / "mixgrpo.gin", bindings)
    cls = guidance[0].split(".")[0]
    assert (cfg.backbone, cfg.num_steps) == (plugin, 25)
    assert gin.query_parameter(guidance[0]) == guidance[1]
    macro = {"sd35-large": "SD35_LARGE_PATH", "qwen-image": "QWENIMAGE_PATH", "flux2-klein": "FLUX2_PATH",
             "z-image": "ZIMAGE_PATH"}[name]  # the gin file's path macro, bound to the model folder
    assert gin.query_parameter(f"%{macro}") == str(tmp_path)
    assert gin.query_parameter(f"{cls}.height") == archs.DEFAULT_SIZE[name]
    rank = {"sd35-large": 32, "qwen-image": 32}.get(name, 64)  # FlowGRPO's 32, Flow-Factory's 64
    assert (gin.query_parameter(f"{cls}.lora_rank"), gin.query_parameter(f"{cls}.lora_alpha")) == (rank, 2 * rank)


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
    (["--methods", "nft"], "choose from flowgrpo, flowgrpo_fast, dancegrpo"),
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


def test_floor_prices_training_calls_without_gradients_as_forwards(bench):
    from .conftest import _load

    costs = {"samples": 8.0, "forward_s": 0.01, "forward_backward_s": 0.03}
    table = {"dancegrpo": {"nfe_rollout": 25.0, "nfe_train": 14.0},  # all trained calls with gradients
             "awm": {"nfe_rollout": 25.0, "nfe_train": 18.0, "nfe_train_nograd": 12.0}}
    _load("bench_floor").add_floors(table, costs)
    assert table["dancegrpo"]["floor_s"] == pytest.approx(8 * (25 * 0.01 + 14 * 0.03))
    assert table["awm"]["floor_s"] == pytest.approx(8 * (37 * 0.01 + 6 * 0.03))  # 25 + 12 forwards, 6 backwards
    # a preset with its own group (TempFlow-GRPO's trunk) is priced at its own samples
    trunk = {"tempflow_grpo": {"nfe_rollout": 12.0, "nfe_train": 0.5, "samples": 54.0}}
    _load("bench_floor").add_floors(trunk, costs)
    assert trunk["tempflow_grpo"]["floor_s"] == pytest.approx(54 * (12 * 0.01 + 0.5 * 0.03))


def test_methods_and_speed_options_reach_the_run(bench, tmp_path):
    assert bench.parse_args([]).methods == list(PAPER_METHODS)  # the default: the paper's Table 1
    assert bench.parse_args(["--methods", "all"]).methods == list(METHODS)
    args = bench.parse_args(["--backbone", "shapes", "--methods", "awm,mixgrpo_flash,mixgrpo", "--compile", "rollout",
                             "--attention-backend", "_native_math"])
    assert args.methods == ["mixgrpo", "mixgrpo_flash", "awm"]  # the table's order
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


def test_trees_and_trunks_time_with_their_own_groups(bench, tmp_path):
    """BranchGRPO's tree has the run's group as leaves (splits scaled from the reference's 0, 3, 6, 9 of
    20 steps); TempFlow-GRPO's group is its trunk's 6 branches per step whatever the run's."""
    from bench_settings import tree_splits, trunk_group

    assert tree_splits(25, 8) == (0, 4, 8) and tree_splits(20, 16) == (0, 3, 6, 9) and tree_splits(10, 2) == (0,)
    assert trunk_group(10) == 54 and trunk_group(25) == 144
    with pytest.raises(ValueError, match="--group-size 2, 4, 8 or 16, not 3"):
        tree_splits(25, 3)
    out = tmp_path / "trees.json"
    bench.main(["--backbone", "toy", "--steps", "25", "--warmup", "0", "--iterations", "1", "--prompts", "1",
                "--group-size", "8", "--threads", "1", "--no-sweeps", "--methods",
                "dancegrpo,branchgrpo,branchgrpo_mix,tempflow_grpo", "--json", str(out)])
    data = json.loads(out.read_text())
    # by hand at T = 25, splits 0, 4, 8: rows per step 1, then 2 over steps 1-4, 4 over 5-8, 8 over 9-24
    assert data["branchgrpo"]["nfe_rollout"] == pytest.approx((1 + 2 * 4 + 4 * 4 + 8 * 16) / 8)
    assert data["branchgrpo"]["nfe_train"] == data["branchgrpo"]["nfe_rollout"]  # every step trained
    # Mix trains its SDE steps 0-3 and the splits 4 and 8: rows 1, 2, 2, 2, 2 (step 4's input: 2 nodes), 4
    assert data["branchgrpo_mix"]["nfe_train"] == pytest.approx((1 + 2 + 2 + 2 + 2 + 4) / 8)
    assert data["tempflow_grpo"]["nfe_rollout"] == pytest.approx((25 + 6 * 300) / 144)  # 24 branch steps
    assert data["tempflow_grpo"]["nfe_train"] == pytest.approx(1 / 6)
    assert (data["tempflow_grpo"]["samples"], data["branchgrpo"]["samples"]) == (144.0, 8.0)


def test_op_grpo_replays_at_the_cost_of_a_fresh_sample(bench, tmp_path):
    """After the untimed first iteration every group replays one stored sample: T − τ walked steps and
    τ no-grad recomputations of the reused steps' log-probs, so T per sample as for FlowGRPO."""
    out = tmp_path / "op.json"
    bench.main(["--backbone", "toy", "--steps", "10", "--warmup", "1", "--iterations", "1", "--prompts", "2",
                "--threads", "1", "--no-sweeps", "--methods", "flowgrpo,op_grpo", "--json", str(out)])
    data = json.loads(out.read_text())
    for method in ("flowgrpo", "op_grpo"):
        assert data[method]["nfe_rollout"] == pytest.approx(rollout_calls(method, 10, group_size=4)) == 10
        assert data[method]["nfe_train"] == pytest.approx(trained_calls(method, 10, group_size=4, groups=2)) == 9
    assert data["op_grpo"]["trainer_nfe_rollout"] == pytest.approx(10)
    assert (data["flowgrpo"]["replay_fraction"], data["op_grpo"]["replay_fraction"]) == (0.0, 0.25)  # 1 of 4


def test_toy_backbone_json(bench, tmp_path):
    out = tmp_path / "toy.json"
    # two rollout chunks of 2 samples, scored in the background: the NFE counts see whole rollouts
    bench.main(["--backbone", "toy", "--steps", "10", "--warmup", "0", "--iterations", "1", "--prompts", "1",
                "--threads", "1", "--sweep-steps", "6,10", "--sweep-group", "4", "--rollout-batch-size", "2",
                "--overlap-rewards", "--methods", "all", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["settings"]["overlap_rewards"] is True and data["settings"]["rollout_batch_size"] == 2
    for method in METHODS:
        assert data[method]["nfe_rollout"] == pytest.approx(rollout_calls(method, 10, group_size=4))
        assert data[method]["nfe_train"] == pytest.approx(trained_calls(method, 10, group_size=4, groups=1))
        assert data[method]["floor_s"] > 0
        assert data[method]["nfe_train_nograd"] == trained_calls_without_grad(method)  # counted at the network
        if method == "flowgrpo_fast":  # drawn each iteration from steps 0 .. T//2 − w
            assert 0 <= data[method]["window_start"] <= 10 // 2 - 2
        else:
            assert data[method]["window_start"] == (-1 if method in ("flowgrpo", "dancegrpo", "diffusionnft", "awm",
                                                                     "op_grpo", "branchgrpo", "branchgrpo_mix",
                                                                     "tempflow_grpo") else 0)
    # AWM's KL runs the toy's frozen copy (a full fine-tune's reference): counted, as the trainer counts it
    assert data["awm"]["nfe_train"] == data["awm"]["trainer_nfe_train"] == 18
    assert [data[m]["kl_beta"] for m in METHODS] == [0.0] * 7 + [1e-4] + [0.0] * 4  # AWM alone keeps its KL
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
