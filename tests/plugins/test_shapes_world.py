"""The procedural shapes world: grammar, sampling, splits, rendering and detection."""

from collections import deque

import numpy as np
import pytest
import torch

from mixgrpo.plugins.world import shapes as S

from .images import blur

ALL_SCENES = [s for level in S.LEVELS for split in S.SPLITS for s in S.scenes(level, split)]


# -- grammar ----------------------------------------------------------------------------------
def test_examples_of_each_level():
    red_circle = S.ObjectSpec("circle", "red")
    assert S.prompt_of(S.SceneSpec((red_circle,))) == "a red circle"
    assert S.prompt_of(S.SceneSpec((S.ObjectSpec("square", "blue", 2),))) == "two blue squares"
    green_square = S.ObjectSpec("square", "green")
    assert S.prompt_of(S.SceneSpec((red_circle, green_square))) == "a red circle and a green square"
    scene = S.SceneSpec((red_circle, S.ObjectSpec("triangle", "blue")), "left of")
    assert S.prompt_of(scene) == "a red circle left of a blue triangle"
    prompts = ("a red circle", "three white triangles", "a red circle and a green square",
               "a red circle below a green square")
    assert [S.parse_prompt(p).level for p in prompts] == [1, 2, 3, 4]


def test_round_trip_every_scene():
    assert len(ALL_SCENES) == 15 + 30 + 180 + 720
    for scene in ALL_SCENES:
        assert S.parse_prompt(S.prompt_of(scene)) == scene


def test_round_trip_sampled_prompts():
    for seed in range(20):
        for split in S.SPLITS:
            for prompt in S.sample_prompts(split, 50, seed):
                assert S.prompt_of(S.parse_prompt(prompt)) == prompt


def test_parse_ignores_case_and_spacing():
    assert S.parse_prompt("  A Red   Circle ") == S.parse_prompt("a red circle")


@pytest.mark.parametrize(("prompt", "word"), [
    ("a purple circle", "'purple'"),
    ("a red hexagon", "'hexagon'"),
    ("four red circles", "'four'"),
    ("a red circle near a blue square", "'near'"),
    ("two red circle", "'circle'"),
    ("a red circles", "'circles'"),
    ("a red circle left a blue square", "'left'"),
    ("red circle", "'red circle'"),
    ("a red circle and a red square", "different colours"),
    ("two red circles left of a blue square", "'two red circles'"),
    ("", "empty"),
])
def test_parse_errors_name_the_word(prompt, word):
    with pytest.raises(ValueError, match=word):
        S.parse_prompt(prompt)


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError):
        S.ObjectSpec("hexagon", "red")
    with pytest.raises(ValueError):
        S.ObjectSpec("circle", "red", 4)
    with pytest.raises(ValueError):
        S.SceneSpec((S.ObjectSpec("circle", "red"),), "left of")
    with pytest.raises(ValueError):
        S.SceneSpec(())


def test_vocabulary_covers_sampled_prompts_exactly():
    vocab = S.vocabulary()
    assert vocab == sorted(set(vocab)) and len(vocab) == 20
    words = {w for split in S.SPLITS for p in S.sample_prompts(split, 1000, 3) for w in p.split()}
    assert words <= set(vocab)
    assert {w for s in ALL_SCENES for w in S.prompt_of(s).split()} == set(vocab)  # no unused word


# -- sampling and splits ----------------------------------------------------------------------
def test_sampling_is_deterministic_under_a_seed():
    assert S.sample_prompts("train", 64, 7) == S.sample_prompts("train", 64, 7)
    assert S.sample_prompts("train", 64, 7) != S.sample_prompts("train", 64, 8)
    assert S.sample_specs(np.random.default_rng(5), 32) == S.sample_specs(5, 32)


def test_sampling_respects_levels():
    for levels in [(1,), (2,), (3, 4)]:
        specs = S.sample_specs(0, 200, levels=levels)
        assert {s.level for s in specs} == set(levels)


def test_splits_are_disjoint_and_both_nonempty():
    for level in S.LEVELS:
        train = {S.prompt_of(s) for s in S.scenes(level, "train")}
        held = {S.prompt_of(s) for s in S.scenes(level, "eval")}
        assert train and held and not train & held
        assert 0.15 <= len(held) / (len(train) + len(held)) <= 0.25
    train = set(S.sample_prompts("train", 2000, 0))
    held = set(S.sample_prompts("eval", 2000, 0))
    assert not train & held
    assert all(S.split_of(S.parse_prompt(p)) == "eval" for p in held)


def test_both_phrasings_of_a_scene_share_a_split():
    flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for scene in S.scenes(3, "eval") + S.scenes(4, "eval"):
        a, b = scene.objects
        other = S.SceneSpec((b, a), scene.relation and flip[scene.relation])
        assert S.split_of(other) == "eval"
    with pytest.raises(ValueError, match="unknown split"):
        S.sample_prompts("test", 3, 0)


# -- rendering --------------------------------------------------------------------------------
def test_render_batch_shape_range_and_determinism():
    specs = S.sample_specs(0, 16)
    images = S.render_batch(specs, seed=1)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert torch.equal(images, S.render_batch(specs, seed=1))
    assert not torch.equal(images, S.render_batch(specs, seed=2))
    assert torch.equal(S.render_batch([S.prompt_of(s) for s in specs], seed=1), images)
    single = S.render(specs[0], 4)
    assert single.shape == (3, 32, 32) and single.dtype == np.float32
    assert np.array_equal(single, S.render(specs[0], np.random.default_rng(4)))


def _colour_masks(image: np.ndarray) -> dict[str, np.ndarray]:
    """Per palette colour, the pixels that are exactly that colour at brightness ≥ 0.5 (renders are
    coverage × colour on black), measured independently of the world's detector."""
    value = image.max(axis=0)
    masks = {}
    for name, rgb in S.COLOURS.items():
        tinted = np.abs(image - value[None] * np.asarray(rgb, np.float32)[:, None, None]).max(axis=0) < 1e-5
        masks[name] = tinted & (value >= 0.5)
    return masks


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, by breadth-first search."""
    seen, comps = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], queue, comp = True, deque([start]), []
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    return comps


def test_renders_satisfy_their_spec():
    specs = S.sample_specs(11, 160)
    images = S.render_batch(specs, seed=12).numpy()
    for spec, image in zip(specs, images):
        masks = _colour_masks(image)
        wanted = {o.colour: o for o in spec.objects}
        for name, mask in masks.items():
            comps = _components(mask)
            if name not in wanted:
                assert not comps, f"{S.prompt_of(spec)}: unexpected {name}"
                continue
            obj = wanted[name]
            assert len(comps) == obj.count, S.prompt_of(spec)
            lo, hi = S.SIZE_RANGE
            fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[obj.kind]
            for comp in comps:  # each area is that of its kind within the size range (± edge pixels)
                assert fill * (lo - 1.5) ** 2 <= len(comp) <= fill * (hi + 1.5) ** 2, S.prompt_of(spec)
        assert (image.max(axis=0) == 0).mean() > 0.5  # mostly background, exactly black
        if spec.relation is not None:
            a, b = (np.argwhere(masks[o.colour]).mean(axis=0) for o in spec.objects)  # (y, x) centroids
            axis, sign = {"left of": (1, 1), "right of": (1, -1), "above": (0, 1), "below": (0, -1)}[spec.relation]
            assert sign * (b[axis] - a[axis]) >= 4.0, S.prompt_of(spec)


def test_objects_keep_apart_and_inside():
    specs = S.sample_specs(2, 100, levels=(2,))  # two or three objects of one colour
    images = S.render_batch(specs, seed=3).numpy()
    assert (images[:, :, 0, :] == 0).all() and (images[:, :, :, -1] == 0).all()  # a 1-pixel margin
    for spec, image in zip(specs, images):
        lit = image.max(axis=0) > 0  # even faint edge pixels
        assert len(_components(lit)) == spec.objects[0].count


# -- detection --------------------------------------------------------------------------------
def _found(dets):
    return sorted((d.colour, d.kind) for d in dets)


def _wanted(spec):
    return sorted((o.colour, o.kind) for o in spec.objects for _ in range(o.count))


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_detector_recovers_rendered_scenes(sigma):
    specs = S.sample_specs(21, 400)
    images = S.render_batch(specs, seed=22)
    images = blur(images, sigma)
    found = S.detect_batch(images)
    assert [_found(d) for d in found] == [_wanted(s) for s in specs]


def test_detect_objects_single_image_and_errors():
    spec = S.parse_prompt("a red circle left of a blue triangle")
    image = torch.from_numpy(S.render(spec, 0))
    dets = S.detect_objects(image)
    assert _found(dets) == [("blue", "triangle"), ("red", "circle")]
    red, blue = sorted(dets, key=lambda d: d.colour, reverse=True)
    assert red.cx < blue.cx and 20 <= red.area <= 130
    assert S.detect_objects(image.numpy()) == dets
    assert S.detect_objects(torch.zeros(3, 32, 32)) == []
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        S.detect_objects(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        S.detect_batch(torch.zeros(2, 1, 32, 32))


def test_connected_components_are_four_connected_and_per_class():
    classes = np.full((1, 5, 5), -1)
    classes[0, 0, 0] = classes[0, 1, 1] = 2  # diagonal neighbours: two components
    classes[0, 3, 0:4] = 1  # one bar ...
    classes[0, 3, 4] = 0  # ... and a touching pixel of another class
    comps = S.connected_components(classes)
    assert comps[0, 0, 0] != comps[0, 1, 1]
    assert len(set(comps[0, 3, 0:4].tolist())) == 1 and comps[0, 3, 4] != comps[0, 3, 0]
    assert (comps[classes < 0] == -1).all()
    assert len(np.unique(comps[comps >= 0])) == 4


def test_noise_yields_few_blobs():
    noise = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert sum(len(d) for d in S.detect_batch(noise)) / 64 < 1.0
