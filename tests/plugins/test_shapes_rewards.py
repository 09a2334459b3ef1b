"""The shapes-world rewards: ground truth scores high, corrupted images low, partial credit, NaN."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mixgrpo.core.plugins import PluginManager
from mixgrpo.plugins.rewards.shapes import (
    CompositionReward,
    PreferenceReward,
    composition_checks,
    relative_position,
)
from mixgrpo.plugins.world import shapes as S
from mixgrpo.testing.rewards import RewardContract

from .images import blur


@pytest.fixture(scope="module")
def truth():
    """400 rendered scenes over all levels: (specs, prompts, images [400, 3, 32, 32])."""
    specs = S.sample_specs(101, 400)
    return specs, [S.prompt_of(s) for s in specs], S.render_batch(specs, seed=102)


def _subset(truth, keep):
    specs, prompts, images = truth
    idx = [i for i, s in enumerate(specs) if keep(s)]
    return [specs[i] for i in idx], [prompts[i] for i in idx], images[idx]


def _no_white(spec):  # a channel permutation leaves white unchanged
    return all(o.colour != "white" for o in spec.objects)


def _flip_relation(images, specs):
    """Mirror each image along its relation's axis, so that the relation is reversed."""
    horizontal = torch.tensor([s.relation in ("left of", "right of") for s in specs])[:, None, None, None]
    return torch.where(horizontal, images.flip(-1), images.flip(-2))


# -- composition ------------------------------------------------------------------------------
def test_composition_ground_truth_is_perfect(truth):
    specs, prompts, images = truth
    scores = CompositionReward()(images, prompts)
    assert scores.mean() >= 0.98 and scores.min() >= 0.95
    for level in S.LEVELS:
        assert scores[[s.level == level for s in specs]].mean() >= 0.98
    assert CompositionReward(strict=True)(images, prompts).mean() >= 0.98


def test_composition_corrupted_images_score_low(truth):
    reward = CompositionReward()
    specs, prompts, images = truth
    assert reward(torch.zeros_like(images), prompts).max() == 0.0
    assert reward(torch.rand(images.shape, generator=torch.Generator().manual_seed(0)), prompts).mean() < 0.1
    _, prompts_c, images_c = _subset(truth, _no_white)
    assert reward(images_c[:, [1, 2, 0]], prompts_c).mean() < 0.15
    specs_r, prompts_r, images_r = _subset(truth, lambda s: s.relation is not None)
    flipped = reward(_flip_relation(images_r, specs_r), prompts_r)
    assert torch.allclose(flipped, torch.full_like(flipped, 6 / 9))  # objects right, relation wrong


def test_composition_gives_partial_credit():
    reward = CompositionReward()

    def score(drawn: str, prompt: str) -> float:
        return float(reward(S.render_batch([drawn], seed=0), [prompt])[0])

    assert score("two red circles", "three red circles") == pytest.approx(2 / 3)  # count wrong
    assert score("a red square", "a red circle") == pytest.approx(2 / 3)  # kind wrong
    assert score("a red circle", "a red circle and a blue square") == pytest.approx(3 / 6)  # one missing
    assert score("a red circle and a blue square", "a red circle") == pytest.approx(0.9)  # an extra
    assert score("two red circles", "a red circle") == pytest.approx(2 / 3)
    assert CompositionReward(strict=True)(S.render_batch(["a red square"], 0), ["a red circle"]).item() == 0.0


def test_composition_checks_are_named():
    spec = S.parse_prompt("a red circle left of a blue triangle")
    dets = S.detect_objects(S.render(spec, 0))
    checks = composition_checks(spec, dets)
    assert checks == {"0.present": 1.0, "0.count": 1.0, "0.kind": 1.0, "1.present": 1.0, "1.count": 1.0,
                      "1.kind": 1.0, "relation": 1.0, "extra": 0.0}


def test_relative_position_follows_geneval():
    def box(cx, cy, side=8.0):
        return S.Detection("red", "square", cx, cy, side**2, (cx - side / 2, cy - side / 2, cx + side / 2,
                                                              cy + side / 2), 1.0, 0.0)

    assert relative_position(box(5, 16), box(25, 16)) == {"left of"}
    assert relative_position(box(25, 16), box(5, 16)) == {"right of"}
    assert relative_position(box(16, 5), box(16, 25)) == {"above"}
    assert relative_position(box(5, 5), box(25, 25)) == {"left of", "above"}  # diagonal: both
    assert relative_position(box(16, 16), box(17, 16)) == set()  # too close to tell


# -- preference -------------------------------------------------------------------------------
def test_preference_ground_truth_is_high(truth):
    specs, prompts, images = truth
    scores = PreferenceReward()(images, prompts)
    assert scores.mean() >= 0.92 and scores.min() >= 0.6
    assert ((scores >= 0.0) & (scores <= 1.0)).all()


def test_preference_corrupted_images_score_lower(truth):
    reward = PreferenceReward()
    specs, prompts, images = truth
    assert reward(torch.zeros_like(images), prompts).max() < 0.05
    assert reward(torch.rand(images.shape, generator=torch.Generator().manual_seed(0)), prompts).max() < 0.05
    _, prompts_c, images_c = _subset(truth, _no_white)
    assert reward(images_c[:, [1, 2, 0]], prompts_c).mean() < 0.1
    specs_r, prompts_r, images_r = _subset(truth, lambda s: s.relation is not None)
    gt, flipped = reward(images_r, prompts_r), reward(_flip_relation(images_r, specs_r), prompts_r)
    assert (flipped < gt - 0.2).all()


def test_preference_strictly_decreases_with_blur_and_noise(truth):
    reward = PreferenceReward()
    _, prompts, images = (part[:96] for part in truth)
    blurred = torch.stack([reward(blur(images, s), prompts) for s in (0.0, 0.4, 0.7, 1.0, 1.5, 2.0)])
    assert (blurred.diff(dim=0) < 0).all()
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    noisy = torch.stack([reward((images + s * eps).clamp(0, 1), prompts) for s in (0.0, 0.02, 0.05, 0.1, 0.2)])
    assert (noisy.diff(dim=0) < 0).all()
    assert blurred[-1].mean() < 0.6 and noisy[-1].mean() < 0.3


def test_preference_is_smooth():
    """Not piecewise constant: a tiny change moves the score a tiny, non-zero amount, and the score
    has a finite, non-zero gradient with respect to the pixels."""
    reward = PreferenceReward()
    prompts = ["a red circle left of a blue triangle", "two green squares"]
    images = blur(S.render_batch(prompts, seed=0), 0.5)
    delta = 1e-3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    a, b = reward(images, prompts), reward((images + delta).clamp(0, 1), prompts)
    assert ((a - b).abs() > 0).all() and ((a - b).abs() < 1e-2).all()
    x = images.clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_preference_terms_name_what_it_rewards():
    spec = S.parse_prompt("two blue squares")
    terms = PreferenceReward().terms(S.render_batch([spec], seed=0), [spec])
    assert set(terms) == {"content", "clean", "sharp"}
    assert all(0.8 <= float(t) <= 1.0 for t in terms.values())
    with pytest.raises(ValueError, match="clean_weight"):
        PreferenceReward(clean_weight=0.8, sharp_weight=0.5)


# -- both -------------------------------------------------------------------------------------
REWARDS = [CompositionReward, PreferenceReward]


@pytest.mark.parametrize("cls", REWARDS)
def test_unparseable_prompt_scores_nan_and_warns_once(cls):
    reward = cls()
    images = S.render_batch(["a red circle", "a red circle"], seed=0)
    with pytest.warns(RuntimeWarning, match="'purple'"):
        scores = reward(images, ["a red circle", "a purple circle"])
    assert scores[0] > 0.5 and math.isnan(scores[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(reward(images, ["a cat", "a dog"])[0])


@pytest.mark.parametrize("cls", REWARDS)
def test_non_finite_image_scores_nan(cls):
    images = S.render_batch(["a red circle", "a red circle"], seed=0)
    images[1, 0, 3, 3] = float("nan")
    scores = cls()(images, ["a red circle"] * 2)
    assert scores[0] > 0.5 and math.isnan(scores[1])


@pytest.mark.parametrize("cls", REWARDS)
def test_invalid_inputs_raise_clear_errors(cls):
    reward = cls()
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\] in \[0, 1\], got \(3, 32, 32\)"):
        reward(torch.zeros(3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match="got \\(2, 1, 32, 32\\)"):
        reward(torch.zeros(2, 1, 32, 32), ["a red circle"] * 2)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(torch.zeros(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match="dtype"):
        reward(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["a red circle"] * 2)


@pytest.mark.parametrize("cls", REWARDS)
def test_other_resolutions_and_dtypes(cls):
    prompts = ["a red circle left of a blue triangle", "three green squares"]
    images = S.render_batch(prompts, seed=0)
    big = F.interpolate(images, scale_factor=2, mode="nearest")  # a 64×64 image of the same scene
    reward = cls()
    base = reward(images, prompts)
    assert (reward(big, prompts) > 0.8).all()
    half = reward(images.half(), prompts)
    assert half.dtype == torch.float32 and torch.allclose(half, base, atol=0.05)


@pytest.mark.parametrize(("name", "cls"), [("shapes.composition", CompositionReward),
                                           ("shapes.preference", PreferenceReward)])
def test_registered_as_plugins(name, cls):
    reward = PluginManager().create("reward", name)
    assert isinstance(reward, cls) and reward.name == name and reward.higher_is_better


# -- the contract -------------------------------------------------------------------------------
class _ShapesInputs:
    def make_inputs(self):
        prompts = S.sample_prompts("eval", 6, seed=0)
        images = blur(S.render_batch(prompts, seed=1), 0.6)
        noise = 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
        return (images + noise).clamp(0, 1), prompts


class TestCompositionContract(_ShapesInputs, RewardContract):
    def make_reward(self):
        return CompositionReward()


class TestPreferenceContract(_ShapesInputs, RewardContract):
    def make_reward(self):
        return PreferenceReward()


class TestCompositionContractDefaultInputs(RewardContract):
    def make_reward(self):
        return CompositionReward()


class TestPreferenceContractDefaultInputs(RewardContract):
    def make_reward(self):
        return PreferenceReward()
