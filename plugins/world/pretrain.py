"""Pretraining the shapes world's base model by flow matching (``mixgrpo pretrain``).

The model is the real FLUX architecture (diffusers ``FluxTransformer2DModel``) at a tiny size with a
one-layer CLIP text encoder over the world's vocabulary, built by ``build_tiny_flux`` and trained
through the same ``FluxBackbone`` that serves FLUX.1-dev: rectified flow on pixels,
``x_σ = (1−σ)·x0 + σ·ε`` with the velocity target ``ε − x0``, σ drawn logit-normal, prompts dropped
to the empty prompt with probability ``prompt_dropout`` (so classifier-free guidance is available),
and an exponential moving average of the weights (with a warmed-up decay, so that no trace of the
random initialisation survives), which is what gets saved.

Training images are rendered on the fly from the ``train`` split only; the held-out ``eval``
scenes are never seen. Every step's batch is a pure function of ``(seed, step)``, and a checkpoint
is written every ``checkpoint_every`` steps to ``work_dir``, so an interrupted pretraining resumes
exactly where it stopped (rerun the same command).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import gin
import numpy as np
import torch

from mixgrpo.core.checkpoint import share_like_open
from mixgrpo.core.progress import progress_bar
from mixgrpo.plugins.world.shapes import LEVELS, prompt_of, render_batch, sample_specs, vocabulary

STATE_FILE = "pretrain_state.pt"
REPORT_FILE = "pretrain_report.json"


@gin.configurable
@attrs.define
class PretrainConfig:
    """How the shapes-world base model is built and pretrained.

    Architecture (``build_tiny_flux``): ``num_layers`` double and ``num_single_layers`` single
    blocks, ``num_attention_heads`` × ``attention_head_dim``, 32×32 RGB packed ``patch``×``patch``,
    a CLIP text encoder of width ``text_dim`` and ``text_layers`` layers.
    Training: ``steps`` AdamW steps of ``batch_size`` at ``learning_rate`` (linear warm-up over
    ``warmup_steps``, cosine decay to 10%), ``ema_decay``, ``prompt_dropout``, σ ~ logit-normal
    (``logit_mean``, ``logit_std``), ``levels`` of the world to draw scenes from, ``seed``;
    ``max_minutes`` stops early on a wall-clock budget (the model is still saved).
    Output: the model in diffusers format in ``output_dir`` (never the model shipped in the package,
    unless ``replace_shipped`` says that is the point: rebuilding it); resumable state in ``work_dir``
    every ``checkpoint_every`` steps. Evaluation: held-out compositional reward on ``eval_prompts``
    prompts × ``eval_seeds`` seeds with ``eval_steps`` Euler steps (shift ``eval_shift``), without
    and with CFG ``eval_cfg``.
    """

    output_dir: str = "runs/shapes-flux"
    replace_shipped: bool = False
    work_dir: str = "runs/pretrain"
    num_layers: int = 2
    num_single_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch: int = 4
    text_dim: int = 64
    text_layers: int = 1
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    levels: tuple[int, ...] = LEVELS
    seed: int = 0
    max_minutes: float | None = None
    checkpoint_every: int = 250
    eval_prompts: int = 64
    eval_seeds: int = 2
    eval_steps: int = 10
    eval_shift: float = 3.0
    eval_cfg: float = 3.0
    progress: bool = True

    def validate(self) -> None:
        from mixgrpo.plugins.backbones import ASSETS

        out = Path(self.output_dir).resolve()
        if (out == ASSETS or ASSETS in out.parents) and not self.replace_shipped:
            raise ValueError(f"PretrainConfig.output_dir = {self.output_dir!r} is the model shipped with mixgrpo; "
                             "pretraining writes elsewhere (e.g. 'runs/shapes-flux', then FluxBackbone.path = "
                             "'runs/shapes-flux'), or set PretrainConfig.replace_shipped = True to rebuild it "
                             "on purpose")
        for name in ("steps", "batch_size", "checkpoint_every", "eval_prompts", "eval_seeds", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"PretrainConfig.prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"PretrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        bad = [level for level in self.levels if level not in LEVELS]
        if bad or not self.levels:
            raise ValueError(f"PretrainConfig.levels must be a non-empty subset of {LEVELS}, got {self.levels}")


def training_batch(config: PretrainConfig, step: int) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of ``step``: prompts (some dropped to ""), data ``x0`` in [−1, 1], noise ε and σ.

    A pure function of ``(config.seed, step)``: a resumed run sees the same batches.
    """
    rng = np.random.default_rng([config.seed, step])
    specs = sample_specs(rng, config.batch_size, levels=config.levels, split="train")
    x0 = render_batch(specs, rng) * 2 - 1
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(config.batch_size, generator=gen))
    dropped = torch.rand(config.batch_size, generator=gen) < config.prompt_dropout
    prompts = ["" if drop else prompt_of(s) for s, drop in zip(specs, dropped.tolist())]
    return prompts, x0, noise, sigma


def flow_matching_loss(backbone, prompts: Sequence[str], x0: torch.Tensor, noise: torch.Tensor,
                       sigma: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted velocity against ``ε − x0`` at ``x_σ = (1−σ)·x0 + σ·ε``."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x = (1 - s) * x0 + s * noise
    v = backbone.velocity(x, sigma, backbone.encode_with_grad(prompts))
    return ((v - (noise - x0)) ** 2).mean()


def learning_rate(config: PretrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``config.learning_rate`` at ``config.steps``."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class _Pretrainer:
    """The state of one pretraining: the backbone, its EMA copies, the optimizer and the step."""

    def __init__(self, config: PretrainConfig, scratch: Path) -> None:
        from mixgrpo.plugins.backbones.flux import FluxBackbone
        from mixgrpo.plugins.backbones.tiny import build_tiny_flux

        self.config = c = config
        build_tiny_flux(scratch, vocab=vocabulary(), patch=c.patch, num_layers=c.num_layers,
                        num_single_layers=c.num_single_layers, attention_head_dim=c.attention_head_dim,
                        num_attention_heads=c.num_attention_heads, text_dim=c.text_dim,
                        text_layers=c.text_layers, seed=c.seed)
        self.backbone = FluxBackbone(str(scratch), device="cpu")
        self.backbone.text_encoder.requires_grad_(True).train()
        self.modules = {"transformer": self.backbone.module, "text_encoder": self.backbone.text_encoder}
        self.ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in self.modules.items()}
        params = [p for m in self.modules.values() for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
        self.step = 0
        self.losses: list[float] = []

    def state(self) -> dict:
        return {"step": self.step, "losses": self.losses, "optimizer": self.optimizer.state_dict(),
                **{f"model.{k}": m.state_dict() for k, m in self.modules.items()},
                **{f"ema.{k}": m.state_dict() for k, m in self.ema.items()}}

    def load(self, state: dict) -> None:
        self.step, self.losses = int(state["step"]), list(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        for k in self.modules:
            self.modules[k].load_state_dict(state[f"model.{k}"])
            self.ema[k].load_state_dict(state[f"ema.{k}"])

    def train_step(self) -> float:
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(c, self.step)
        loss = flow_matching_loss(self.backbone, *training_batch(c, self.step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in self.modules.values() for p in m.parameters()], 1.0)
        self.optimizer.step()
        # warmed-up decay: a plain 0.999 would keep 0.999^1500 = 22% of the random initialisation
        decay = min(c.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for k, m in self.modules.items():
                for p_ema, p in zip(self.ema[k].parameters(), m.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        self.step += 1
        self.losses.append(loss.item())
        return self.losses[-1]


def _save_checkpoint(trainer: _Pretrainer, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / (STATE_FILE + ".tmp")
    torch.save(trainer.state(), tmp)
    tmp.replace(work / STATE_FILE)  # atomic: an interrupted write never replaces a good checkpoint


def _export(trainer: _Pretrainer, scratch: Path, output: Path) -> None:
    """Write the EMA weights as a diffusers-format model folder at ``output`` (atomically)."""
    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(scratch, tmp)
    trainer.ema["transformer"].save_pretrained(tmp / "transformer", safe_serialization=True)
    trainer.ema["text_encoder"].save_pretrained(tmp / "text_encoder", safe_serialization=True)
    share_like_open(tmp)  # safetensors writes 0600; a shared model folder must be readable
    if output.exists():
        shutil.rmtree(output)
    tmp.replace(output)


def evaluate_base_model(path: str | Path, *, prompts: int = 64, seeds: int = 2, num_steps: int = 10,
                        shift: float = 3.0, cfg_scale: float = 1.0, seed: int = 1) -> dict[str, float]:
    """Held-out compositional reward (mean, SE, strict accuracy) of the model at ``path``, loaded
    through the ``flux`` backbone plugin and sampled with the Euler ODE."""
    from mixgrpo.core.rollout import SamplingSetup, sample_ode
    from mixgrpo.core.scoring import evaluate as evaluate_rewards
    from mixgrpo.plugins.backbones.flux import FluxBackbone
    from mixgrpo.plugins.rewards.shapes import CompositionReward
    from mixgrpo.plugins.samplers.euler import Euler
    from mixgrpo.plugins.world.shapes import sample_prompts

    backbone = FluxBackbone(str(path), cfg_scale=cfg_scale, device="cpu")
    texts = sample_prompts("eval", prompts, seed)
    all_prompts = [p for _ in range(seeds) for p in texts]
    all_seeds = [seed + 1000 * s for s in range(seeds) for _ in texts]
    images = sample_ode(backbone, all_prompts, all_seeds, setup=SamplingSetup(num_steps=num_steps, shift=shift),
                        solver=Euler(), batch_size=64)
    scores = evaluate_rewards({"composition": CompositionReward(),
                               "strict": CompositionReward(strict=True)}, images, all_prompts)
    return {k.removeprefix("eval/"): v for k, v in scores.items()}


def pretrain(config: PretrainConfig) -> dict:
    """Pretrain (resuming from ``work_dir`` when it holds a checkpoint), save the model, evaluate it.

    Returns the report written to ``output_dir/pretrain_report.json``.
    """
    config.validate()
    c, work, output = config, Path(config.work_dir), Path(config.output_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir) / "model"
        trainer = _Pretrainer(c, scratch)
        if (work / STATE_FILE).is_file():
            trainer.load(torch.load(work / STATE_FILE, weights_only=True))
            print(f"[pretrain] resuming from {work / STATE_FILE} at step {trainer.step}")
        bar = progress_bar(total=c.steps, initial=trainer.step, desc="pretrain", unit="step", disable=not c.progress)
        while trainer.step < c.steps:
            loss = trainer.train_step()
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if trainer.step % c.checkpoint_every == 0:
                _save_checkpoint(trainer, work)
            if c.max_minutes is not None and time.perf_counter() - started > 60 * c.max_minutes:
                print(f"[pretrain] stopping at step {trainer.step}: max_minutes={c.max_minutes} reached")
                break
        bar.close()
        _save_checkpoint(trainer, work)
        _export(trainer, scratch, output)
    seconds = time.perf_counter() - started
    last = trainer.losses[-100:]
    report = {"steps": trainer.step, "seconds": round(seconds, 1), "final_loss": sum(last) / max(len(last), 1),
              "config": {k: v for k, v in attrs.asdict(c).items() if k not in ("output_dir", "work_dir")}}
    for cfg in (1.0, c.eval_cfg):
        scores = evaluate_base_model(output, prompts=c.eval_prompts, seeds=c.eval_seeds, num_steps=c.eval_steps,
                                     shift=c.eval_shift, cfg_scale=cfg)
        report[f"heldout_cfg{cfg:g}"] = scores
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_pretrain(config_file: str | Path, bindings: Sequence[str] = ()) -> dict:
    """``mixgrpo pretrain CONFIG.gin``: parse the gin file, pretrain, print the held-out scores."""
    from mixgrpo.core.config import parse_gin

    parse_gin([config_file], bindings)
    report = pretrain(PretrainConfig())
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return report
