"""Pretraining the shapes-world base model: batches, schedule, the loss, resume, the saved folder."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.core.plugins import get_plugin_manager
from mixgrpo.plugins.backbones.flux import FluxBackbone
from mixgrpo.plugins.world.pretrain import (
    REPORT_FILE,
    PretrainConfig,
    flow_matching_loss,
    learning_rate,
    pretrain,
    training_batch,
)
from mixgrpo.plugins.world.shapes import parse_prompt, split_of

TINY = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, text_dim=32,
            batch_size=4, warmup_steps=1, eval_prompts=2, eval_seeds=1, eval_steps=2, progress=False)


def test_training_batch_is_a_pure_function_of_seed_and_step():
    cfg = PretrainConfig(batch_size=256, prompt_dropout=0.25)
    a, b, c = training_batch(cfg, 7), training_batch(cfg, 7), training_batch(cfg, 8)
    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    assert a[0] != c[0] and not torch.equal(a[1], c[1])
    prompts, x0, noise, sigma = a
    assert x0.shape == (256, 3, 32, 32) and x0.min() >= -1 and x0.max() <= 1 and noise.shape == x0.shape
    assert 0 < sigma.min() and sigma.max() < 1
    kept = [p for p in prompts if p]
    assert 0.15 < 1 - len(kept) / len(prompts) < 0.35  # dropout 0.25
    assert all(split_of(parse_prompt(p)) == "train" for p in kept)  # held-out scenes are never trained on


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = PretrainConfig(steps=1000, warmup_steps=100, learning_rate=1e-3)
    assert learning_rate(cfg, 0) == pytest.approx(1e-5)
    assert learning_rate(cfg, 99) == pytest.approx(1e-3)
    assert learning_rate(cfg, 550) == pytest.approx(0.55e-3)
    assert learning_rate(cfg, 1000) == pytest.approx(1e-4)


class _Identity:
    """A stand-in backbone whose velocity is its input: the loss is then ‖x_σ − (ε − x0)‖²."""

    def encode_with_grad(self, prompts):
        return None

    def velocity(self, x, sigma, cond):
        return x


def test_flow_matching_loss_against_a_float64_rederivation():
    gen = torch.Generator().manual_seed(0)
    x0, noise, sigma = torch.rand(5, 3, 4, 4, generator=gen), torch.randn(5, 3, 4, 4, generator=gen), torch.rand(5)
    got = flow_matching_loss(_Identity(), [""] * 5, x0, noise, sigma)
    x0d, nd, sd = x0.double(), noise.double(), sigma.double()[:, None, None, None]
    expected = (((1 - sd) * x0d + sd * nd - (nd - x0d)) ** 2).mean()
    assert float(got) == pytest.approx(float(expected), rel=1e-6)


def test_resumed_pretraining_equals_an_uninterrupted_one(tmp_path):
    straight = PretrainConfig(**TINY, steps=4, output_dir=str(tmp_path / "a"), work_dir=str(tmp_path / "wa"))
    report = pretrain(straight)
    assert report["steps"] == 4
    first = PretrainConfig(**TINY, steps=2, output_dir=str(tmp_path / "b"), work_dir=str(tmp_path / "wb"))
    pretrain(first)
    second = PretrainConfig(**TINY, steps=4, output_dir=str(tmp_path / "b"), work_dir=str(tmp_path / "wb"))
    pretrain(second)
    for part in ("transformer", "text_encoder"):
        name = "diffusion_pytorch_model.safetensors" if part == "transformer" else "model.safetensors"
        a, b = load_file(tmp_path / "a" / part / name), load_file(tmp_path / "b" / part / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_pretrained_folder_loads_through_the_flux_plugin(tmp_path):
    out = tmp_path / "model"
    pretrain(PretrainConfig(**TINY, steps=2, output_dir=str(out), work_dir=str(tmp_path / "w")))
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["steps"] == 2 and np.isfinite(report["final_loss"])
    for key in ("heldout_cfg1", "heldout_cfg3"):
        assert 0 <= report[key]["composition/mean"] <= 1
    backbone = get_plugin_manager().create("backbone", "flux", path=str(out))
    assert isinstance(backbone, FluxBackbone) and backbone.latent_shape() == (3, 32, 32)
    assert backbone.text_encoder.config.num_hidden_layers == 1


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="levels must be a non-empty subset"):
        PretrainConfig(levels=(5,)).validate()
    with pytest.raises(ValueError, match="prompt_dropout"):
        PretrainConfig(prompt_dropout=1.0).validate()


def test_pretraining_never_overwrites_the_shipped_model_by_accident():
    from mixgrpo.plugins.backbones import ASSETS

    with pytest.raises(ValueError, match="is the model shipped with mixgrpo"):
        pretrain(PretrainConfig(**TINY, steps=1, output_dir=str(ASSETS / "shapes-flux")))
    PretrainConfig(**TINY, output_dir=str(ASSETS / "shapes-flux"), replace_shipped=True).validate()  # on purpose
