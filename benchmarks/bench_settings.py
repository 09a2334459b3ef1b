"""What one benchmark invocation is: the method presets, the backbones, and ``Run``, the settings
shared by every measurement of an invocation together with the gin bindings they make.

Part of ``benchmarks/iteration_time.py`` (the entry point); see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import architectures  # benchmarks/architectures.py
import torch

ROOT = Path(__file__).resolve().parent.parent

# The MixGRPO paper's Table 1 presets (the default rows), then the newer methods: Flow-GRPO-Fast, the
# forward-process objectives (DiffusionNFT, AWM), OP-GRPO's replay, BranchGRPO's trees (pure and mixed)
# and TempFlow-GRPO's trunk, timed on request (--methods).
PAPER_METHODS = ["flowgrpo", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]
METHODS = ["flowgrpo", "flowgrpo_fast", "dancegrpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star",
           "diffusionnft", "awm", "op_grpo", "branchgrpo", "branchgrpo_mix", "tempflow_grpo"]
TREES = ("branchgrpo", "branchgrpo_mix")
REFERENCE_SPLITS, REFERENCE_STEPS = (0, 3, 6, 9), 20  # BranchGRPO's script: splits at 0, 3, 6, 9 of 20 steps
TRUNK_BRANCHES = 6  # TempFlow-GRPO's preset: 6 samples off the trunk at each branch step


def tree_splits(steps: int, group_size: int) -> tuple[int, ...]:
    """BranchGRPO's split steps for a tree of ``group_size`` leaves (two children per split) on a grid of
    ``steps``: the first log2(group_size) of the reference's splits, scaled to the grid."""
    depth = group_size.bit_length() - 1
    if group_size < 2 or 2**depth != group_size or depth > len(REFERENCE_SPLITS):
        raise ValueError(f"BranchGRPO's tree has 2, 4, 8 or 16 leaves, so it times with --group-size 2, 4, 8 or 16, "
                         f"not {group_size}")
    return tuple(round(s * steps / REFERENCE_STEPS) for s in REFERENCE_SPLITS[:depth])


def trunk_group(steps: int) -> int:
    """TempFlow-GRPO's samples per prompt at ``steps``: 6 off the trunk at each of steps 0 … ⌊0.99·T⌋ − 1."""
    return TRUNK_BRANCHES * int(0.99 * steps)
REFERENCE = "dancegrpo"
REAL = tuple(architectures.ARCHS)  # flux-dev, sd35-medium, sd35-large, qwen-image, flux2-klein, z-image
BACKBONES = ("toy", "shapes", *REAL)
# LoRA ranks on one GPU, each the rank its recipe trains: 64 for FLUX.1 (a single-GPU FLUX set-up),
# FLUX.2-klein and Z-Image (Flow-Factory's), 32 for SD3.5 and Qwen-Image (FlowGRPO's).
LORA_RANK = {"flux-dev": 64, "sd35-medium": 32, "sd35-large": 32, "qwen-image": 32, "flux2-klein": 64,
             "z-image": 64}
# Per real architecture: its backbone class, its gin file (experiments/backbones/) and that file's path macro.
BACKBONE_GIN = {
    "flux-dev": ("FluxBackbone", "flux.gin", "FLUX_PATH"),
    "sd35-medium": ("SD3Backbone", "sd3.gin", "SD3_PATH"),
    "sd35-large": ("SD3Backbone", "sd35_large.gin", "SD35_LARGE_PATH"),
    "qwen-image": ("QwenImageBackbone", "qwenimage.gin", "QWENIMAGE_PATH"),
    "flux2-klein": ("Flux2Backbone", "flux2_klein.gin", "FLUX2_PATH"),
    "z-image": ("ZImageBackbone", "zimage.gin", "ZIMAGE_PATH"),
}
_RES = "256,512,768"
DEFAULT_SWEEPS = {
    "toy": {"steps": "10,25,40", "group": "2,4,8", "res": "", "window": "0,10,21"},
    "shapes": {"steps": "10,25,40", "group": "2,4,8", "res": "", "window": "0,5,10,21"},
    "flux-dev": {"steps": "10,25,40", "group": "2,4,8", "res": "512,720,1024", "window": "0,21"},
    "sd35-medium": {"steps": "10,25,40", "group": "2,4,8", "res": _RES, "window": "0,21"},
    "sd35-large": {"steps": "10,25,40", "group": "2,4,8", "res": _RES, "window": "0,21"},
    "qwen-image": {"steps": "10,25,40", "group": "2,4,8", "res": _RES, "window": "0,21"},
    "flux2-klein": {"steps": "4,8,28", "group": "2,4,8", "res": "384,512,1024", "window": "0,6"},
    "z-image": {"steps": "10,25,40", "group": "2,4,8", "res": _RES, "window": "0,21"},
}
TINY_SWEEPS = {"steps": "12,25", "group": "2,3", "res": "32,48", "window": "0,21"}
PRESET_WINDOW = 4  # the window size of every MixGRPO preset (experiments/methods/)
MOVING_WINDOW = ("mixgrpo", "mixgrpo_flash")  # the presets whose window moves (progressive)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The command-line flags a Run keeps as they are (argparse's names for them).
_KEPT_FLAGS = ("backbone", "tiny", "steps", "group_size", "prompts", "warmup", "at_iteration", "iterations",
               "gradient_checkpointing", "attention_backend", "compile", "overlap_rewards", "methods")


class Run:
    """The settings shared by every measurement of one invocation, and the gin bindings they make."""

    backbone: str
    tiny: bool
    steps: int
    group_size: int
    prompts: int
    warmup: int
    at_iteration: int
    iterations: int
    gradient_checkpointing: bool
    attention_backend: str | None
    compile: str
    overlap_rewards: bool
    methods: list[str]

    def __init__(self, args: argparse.Namespace, model_dir: Path | None) -> None:
        for name in _KEPT_FLAGS:
            setattr(self, name, getattr(args, name))
        self.device = torch.device(args.device)
        self.model_dir = model_dir
        self.real = self.backbone in REAL
        self.arch = architectures.load_arch(self.backbone, tiny=self.tiny) if self.real else None
        default_size = architectures.TINY_SIZE if self.tiny else architectures.DEFAULT_SIZE.get(self.backbone)
        self.size = args.size or default_size
        self.dtype = args.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        default_rank = 4 if self.tiny else LORA_RANK.get(self.backbone, 0)
        self.lora_rank = args.lora_rank if args.lora_rank is not None else default_rank
        self.rollout_batch = args.rollout_batch_size
        self.micro_batch = args.micro_batch_size
        self.share_prefix = not args.no_share_prefix

    def bindings(self, out: str, steps: int | None = None, group_size: int | None = None,
                 size: int | None = None, method: str | None = None) -> list[str]:
        """The bindings after ``method``'s preset. The shapes world's file brings its model, and
        also its demo's window schedule (shifted every 10 iterations, for a 40-iteration run); the
        preset is read again after it so that every backbone times the presets' own schedules."""
        steps, group_size, size = steps or self.steps, group_size or self.group_size, size or self.size
        common = [
            f"TrainConfig.num_steps = {steps}", f"TrainConfig.group_size = {group_size}",
            f"TrainConfig.prompts_per_iteration = {self.prompts}", "TrainConfig.prompt_set = 'shapes'",
            "TrainConfig.rewards = {'shapes.preference': 1.0}", "TrainConfig.eval_rewards = ()",
            "TrainConfig.eval_every = 0", "TrainConfig.sample_every = 0", "TrainConfig.checkpoint_every = 0",
            "TrainConfig.tensorboard = False", "TrainConfig.progress = False", f"TrainConfig.output_dir = '{out}'",
            "TrainConfig.num_minibatches = 1", f"TrainConfig.overlap_rewards = {self.overlap_rewards}",
            f"TrainConfig.share_prefix = {self.share_prefix}",
            "FlowGRPO.kl_beta = 0.0", "OPGRPO.kl_beta = 0.0",  # the FLUX recipes of the paper train without KL
        ]
        if method == "op_grpo":  # the same prompts every iteration: after the first, each group replays one sample
            common.append(f"ShapesPrompts.pool = {self.prompts}")
        if method in TREES:  # the tree's leaves are the group
            common.append(f"Branching.branch_steps = {tree_splits(steps, group_size)}")
        if method == "tempflow_grpo":  # its own group: the trunk's branches
            common.append(f"TrainConfig.group_size = {trunk_group(steps)}")
        batches = []
        if self.rollout_batch:
            batches.append(f"TrainConfig.rollout_batch_size = {self.rollout_batch}")
        if self.micro_batch:
            batches.append(f"TrainConfig.micro_batch_size = {self.micro_batch}")
        if self.backbone == "toy":
            return ["TrainConfig.backbone = 'toy'", "ToyBackbone.size = 16", "ToyBackbone.hidden = 32",
                    *common, *batches]
        if self.backbone == "shapes":
            preset = [f"include '{ROOT / 'experiments/methods' / method}.gin'"] if method else []
            return [f"include '{ROOT / 'experiments/shapes/world.gin'}'", *preset, *common, *batches,
                    *self.speed_bindings("FluxBackbone")]
        if not self.rollout_batch:
            batches.append("TrainConfig.rollout_batch_size = 4")
        if not self.micro_batch:
            batches.append("TrainConfig.micro_batch_size = 2")
        return [*self.real_backbone_bindings(size), *common, *batches]

    def real_backbone_bindings(self, size: int) -> list[str]:
        """The real architectures: their backbone's gin file, the benchmark's model folder, and the
        backbone's dtype, image side, LoRA and speed options."""
        cls, gin_file, macro = BACKBONE_GIN[self.backbone]
        head = [f"include '{ROOT / 'experiments/backbones' / gin_file}'", f"{macro} = '{self.model_dir}'"]
        if self.arch["backbone"] == "flux2":  # the base klein (guided, as RL trains it), one stand-in Qwen3 layer
            layers = tuple(self.arch["text"]["text_encoder_out_layers"])
            head += [f"{cls}.text_encoder_out_layers = {layers}", f"{cls}.cfg_scale = 4.0"]
        backbone = [
            f"{cls}.dtype = '{self.dtype}'", f"{cls}.height = {size}", f"{cls}.width = {size}",
            f"{cls}.lora_rank = {self.lora_rank}",
            f"{cls}.lora_alpha = {2 * self.lora_rank if self.lora_rank else None}",
            f"{cls}.gradient_checkpointing = {self.gradient_checkpointing}", f"{cls}.device = '{self.device}'",
        ]
        if self.tiny:  # the real lengths come from the backbone's gin file (FLUX 512, SD3.5-M 128, ...)
            backbone.append(f"{cls}.max_sequence_length = {self.arch['text']['max_sequence_length']}")
        return [*head, *backbone, *self.speed_bindings(cls)]

    def speed_bindings(self, cls: str) -> list[str]:
        """The backbone's speed options (docs/benchmarks.md): diffusers' attention backend, torch.compile."""
        out = [f"{cls}.compile = '{self.compile}'"]
        if self.attention_backend:
            out.append(f"{cls}.attention_backend = '{self.attention_backend}'")
        return out

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Real architectures: components load with random weights on the target device."""
        if not self.real:
            yield
            return
        with architectures.random_weights(self.model_dir, self.device, DTYPES[self.dtype]):
            yield
