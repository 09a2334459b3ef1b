"""Editing prompts: ``EditPrompt`` (a str with its source image), the ``edit`` prompt set (JSONL or
folder), its errors before any model loads, and the core passing source images to a reward that asks."""

from __future__ import annotations

import copy
import json
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.core.interfaces import Reward
from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.rollout import encode_unique
from mixgrpo.core.scoring import call_reward
from mixgrpo.core.types import EditPrompt
from mixgrpo.plugins import prompts_edit
from mixgrpo.plugins.prompts_edit import EditPrompts


def write_png(path, height, width, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def edits(tmp_path):
    """A JSONL of 6 edits (relative paths, one absolute; a blank line) over 3 images of different sizes."""
    for n, (h, w) in enumerate([(20, 30), (32, 32), (17, 9)]):
        write_png(tmp_path / f"img{n}.png", h, w, seed=n)
    lines = [{"image": f"img{n % 3}.png", "instruction": f"edit number {n}"} for n in range(6)]
    lines[4]["image"] = str(tmp_path / "img1.png")
    text = "\n".join(json.dumps(line) for line in lines[:3]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[3:])
    (tmp_path / "edits.jsonl").write_text(text + "\n")
    return tmp_path / "edits.jsonl"


# -- EditPrompt ----------------------------------------------------------------------------------------
def test_edit_prompt_is_a_string_whose_identity_includes_its_image():
    a, b = EditPrompt("make it red", "x.png"), EditPrompt("make it red", "y.png")
    a2 = EditPrompt("make it red", "x.png")
    assert isinstance(a, str) and a.upper() == "MAKE IT RED" and f"{a}!" == "make it red!"
    assert a == a2 and hash(a) == hash(a2) and a != b and not (a == b)
    assert a != "make it red" and "make it red" != a  # a plain string never equals an edit (hashes differ)
    assert list(dict.fromkeys([a, b, a2, "make it red"])) == [a, b, "make it red"]
    assert repr(a) == "EditPrompt('make it red', image='x.png')"
    for copied in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a), copy.copy(a)):
        assert type(copied) is EditPrompt and copied == a and copied.image == "x.png"


def test_encode_unique_keeps_edits_of_different_images_apart(tmp_path):
    """The rollout encodes each distinct prompt once: two images with one instruction are two prompts."""
    from mixgrpo.plugins.backbones.toy import ToyBackbone

    toy = ToyBackbone()
    seen = []
    encode = toy.encode
    toy.encode = lambda prompts: (seen.append(list(prompts)), encode(prompts))[1]
    a, b = EditPrompt("make it red", "x.png"), EditPrompt("make it red", "y.png")
    cond = encode_unique(toy, [a, b, a, b])
    assert len(seen) == 1 and seen[0] == [a, b] and [p.image for p in seen[0]] == ["x.png", "y.png"]
    assert len(cond) == 4


def test_pixels_are_the_diffusers_image_processors(tmp_path):
    """Resized as FluxKontextPipeline's VaeImageProcessor resizes a PIL image (Lanczos), 8-bit levels / 255."""
    from diffusers.image_processor import VaeImageProcessor

    path = write_png(tmp_path / "a.png", 36, 52, seed=4)
    processor = VaeImageProcessor(vae_scale_factor=4)
    for h, w in [(24, 40), (36, 52), (64, 16)]:  # down, as it is, up
        expected = (processor.preprocess(processor.resize(Image.open(path), h, w), h, w)[0] + 1) / 2
        ours = EditPrompt("x", path).pixels(h, w)
        assert ours.shape == (3, h, w) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    gray = tmp_path / "gray.png"  # a grayscale source becomes RGB
    Image.fromarray(np.full((8, 8), 51, dtype=np.uint8), mode="L").save(gray)
    torch.testing.assert_close(EditPrompt("x", gray).pixels(8, 8), torch.full((3, 8, 8), 0.2))


# -- the prompt set ------------------------------------------------------------------------------------
def test_jsonl_edits_split_and_draw(edits, tmp_path):
    prompts = EditPrompts(str(edits), eval_fraction=0.3)
    assert [str(p) for p in prompts.train] == [f"edit number {n}" for n in range(3)] + ["edit number 3"]
    assert [str(p) for p in prompts.eval] == ["edit number 4", "edit number 5"]
    assert all(isinstance(p, EditPrompt) for p in prompts.train + prompts.eval)
    assert prompts.train[1].image == str(tmp_path / "img1.png")  # relative to the JSONL's folder
    assert prompts.eval[0].image == str(tmp_path / "img1.png")  # absolute, as given
    assert prompts("eval", 3, seed=0) == [prompts.eval[0], prompts.eval[1], prompts.eval[0]]
    epoch = prompts("train", 4, seed=7, iteration=0)
    assert sorted(epoch, key=str) == sorted(prompts.train, key=str)  # each drawn once per epoch
    assert prompts("train", 4, seed=7, iteration=0) == epoch and all(isinstance(p, EditPrompt) for p in epoch)


def test_folder_of_images_with_instructions(tmp_path):
    folder = tmp_path / "edits"
    folder.mkdir()
    for n, name in enumerate(["b", "a", "c"]):
        write_png(folder / f"{name}.png", 8, 8, seed=n)
        (folder / f"{name}.txt").write_text(f"  make {name} blue \n")
    (folder / "notes.md").write_text("ignored")
    prompts = EditPrompts(str(folder), eval_path=str(folder))
    assert [(str(p), p.image) for p in prompts.train] == [(f"make {n} blue", str(folder / f"{n}.png")) for n in "abc"]
    (folder / "c.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"c\.png: no instruction beside it; write it to c\.txt"):
        EditPrompts(str(folder))


@pytest.mark.parametrize("line, error, message", [
    ('{"image": "missing.png", "instruction": "x"}', FileNotFoundError, r"line 2: source image .*missing\.png' not"),
    ('{"image": "broken.png", "instruction": "x"}', ValueError, r"line 2: source image .*broken\.png' is not"),
    ('{"image": "cut.png", "instruction": "x"}', ValueError, r"line 2: source image .*cut\.png' is not a readable"),
    ('{"image": "ok.png"}', ValueError, r"line 2: needs \"image\" \(a path\) and \"instruction\""),
    ('{"image": "ok.png", "instruction": "  "}', ValueError, r"line 2: needs"),
    ('not json', ValueError, r"line 2: not a JSON object"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, error, message):
    write_png(tmp_path / "ok.png", 8, 8, seed=0)
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])  # a truncated PNG
    path = tmp_path / "edits.jsonl"
    path.write_text('{"image": "ok.png", "instruction": "fine"}\n' + line + "\n")
    with pytest.raises(error, match=message) as info:
        EditPrompts(str(path), eval_path=str(path))
    assert str(path) in str(info.value)


def test_missing_or_empty_sets_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="JSONL file of .* or a folder"):
        EditPrompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no edits"):
        EditPrompts(str(tmp_path / "empty.jsonl"))
    write_png(tmp_path / "ok.png", 8, 8, seed=0)
    (tmp_path / "one.jsonl").write_text('{"image": "ok.png", "instruction": "x"}\n')
    with pytest.raises(ValueError, match="too few to hold out"):
        EditPrompts(str(tmp_path / "one.jsonl"))


def test_the_trainer_reports_a_bad_image_before_any_model_loads(tmp_path):
    """The prompt set is built before the backbone: a missing image is reported though the model path
    does not exist either."""
    from mixgrpo.core.config import load_config
    from mixgrpo.core.trainer import Trainer
    from mixgrpo.plugins.backbones import flux_kontext

    (tmp_path / "edits.jsonl").write_text('{"image": "gone.png", "instruction": "make it red"}\n')
    gin = tmp_path / "run.gin"
    gin.write_text("\n".join([
        "TrainConfig.backbone = 'flux_kontext'", f"FluxKontextBackbone.path = '{tmp_path / 'no_model'}'",
        "TrainConfig.prompt_set = 'edit'", f"EditPrompts.train_path = '{tmp_path / 'edits.jsonl'}'",
        "TrainConfig.rewards = {'shapes.preference': 1.0}", f"TrainConfig.output_dir = '{tmp_path / 'run'}'",
        "TrainConfig.progress = False", "TrainConfig.trackers = []"]) + "\n")
    pm = PluginManager()
    missing = [module for module, kind, name in ((flux_kontext, "backbone", "flux_kontext"),
                                                  (prompts_edit, "prompt_set", "edit")) if name not in pm.names(kind)]
    config, pm = load_config(gin, pm=PluginManager(plugins=missing) if missing else pm)
    with pytest.raises(FileNotFoundError, match=r"edits\.jsonl, line 1: source image .*gone\.png' not found"):
        Trainer(config, pm)


@pytest.mark.parametrize("case", ["editing backbone, text prompts", "text backbone, edit prompts"])
def test_a_backbone_and_a_prompt_set_that_disagree_on_sources_are_refused_before_any_model_loads(
        tmp_path, edits, case):
    from mixgrpo.core.config import load_config
    from mixgrpo.core.trainer import Trainer
    from mixgrpo.plugins.backbones import flux_kontext

    if case == "editing backbone, text prompts":
        lines = ["TrainConfig.backbone = 'flux_kontext'", f"FluxKontextBackbone.path = '{tmp_path / 'no_model'}'",
                 "TrainConfig.prompt_set = 'shapes'"]
        message = ("TrainConfig.backbone = 'flux_kontext' edits a source image per prompt, but TrainConfig.prompt_set "
                   "= 'shapes' gives plain text prompts: use a prompt set whose items carry a source image "
                   "(TrainConfig.prompt_set = 'edit'")
    else:
        lines = ["TrainConfig.backbone = 'flux'", f"FluxBackbone.path = '{tmp_path / 'no_model'}'",
                 "TrainConfig.prompt_set = 'edit'", f"EditPrompts.train_path = '{edits}'"]
        message = ("TrainConfig.prompt_set = 'edit' gives edit prompts (an instruction with a source image), but "
                   "TrainConfig.backbone = 'flux' generates from text alone")
    gin = tmp_path / "run.gin"
    gin.write_text("\n".join([*lines, "TrainConfig.rewards = {'shapes.preference': 1.0}",
                               f"TrainConfig.output_dir = '{tmp_path / 'run'}'", "TrainConfig.progress = False",
                               "TrainConfig.trackers = []"]) + "\n")
    pm = PluginManager()
    missing = [module for module, kind, name in ((flux_kontext, "backbone", "flux_kontext"),
                                                  (prompts_edit, "prompt_set", "edit")) if name not in pm.names(kind)]
    config, pm = load_config(gin, pm=PluginManager(plugins=missing) if missing else pm)
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer(config, pm)  # the model path does not exist: the refusal comes first
    assert not (tmp_path / "run").exists()


# -- the core hands source images to a reward that asks ------------------------------------------------
class Recording(Reward):
    """Scores the mean of each image; keeps what it was called with."""

    def __init__(self, asks: bool):
        self.uses_source_images, self.calls = asks, []

    def __call__(self, images, prompts, **kwargs):
        self.calls.append(kwargs)
        return images.mean(dim=(1, 2, 3))


class TwoArguments(Reward):
    """A reward written before source images existed: its call takes images and prompts only."""

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def test_a_reward_that_asks_gets_the_sources_at_the_images_size(tmp_path):
    paths = [write_png(tmp_path / f"{n}.png", 20 + n, 30, seed=n) for n in range(3)]
    prompts = [EditPrompt(f"edit {n}", p) for n, p in enumerate(paths)]
    images = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    reward = Recording(asks=True)
    scores = call_reward(reward, "rec", images, prompts)
    torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)))
    sources = reward.calls[0]["sources"]
    expected = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize(
        (24, 16), Image.Resampling.LANCZOS))).permute(2, 0, 1).float() / 255 for p in paths])
    assert sources.shape == (3, 3, 16, 24)
    torch.testing.assert_close(sources, expected, atol=0, rtol=0)


def test_a_reward_that_does_not_ask_gets_todays_call(tmp_path):
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = [EditPrompt("a", tmp_path / "never_read.png"), "plain"]  # the image is never opened
    recording = Recording(asks=False)
    call_reward(recording, "rec", images, prompts)
    assert recording.calls == [{}]
    torch.testing.assert_close(call_reward(TwoArguments(), "two", images, prompts), images.mean(dim=(1, 2, 3)))


def test_source_images_for_plain_prompts_mask_the_call_with_the_fix(tmp_path):
    images = torch.rand(2, 3, 8, 8)
    errors = {}
    with pytest.warns(RuntimeWarning, match="reward 'rec' failed on 2 samples"):
        scores = call_reward(Recording(asks=True), "rec", images, ["a red circle", "two squares"], errors)
    assert torch.isnan(scores).all()
    assert isinstance(errors["rec"], ValueError)
    assert "prompt 'a red circle' carries none" in str(errors["rec"]) and "EditPrompt" in str(errors["rec"])
