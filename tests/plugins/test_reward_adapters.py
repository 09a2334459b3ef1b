"""The OCR and GenEval adapters with their scorers replaced by stand-ins that answer in the packages'
output formats (PaddleOCR 2.x's ``ocr`` result; mmdet 2.x's per-class ``[N, 5]`` boxes), against
scores derived by hand from flow_grpo's OCR formula and the GenEval reward server's rules, locally
and through serve-reward's app."""

import json
import random
import sys
from functools import cache

import numpy as np
import pytest
import torch

from mixgrpo.core.plugins import PluginManager
from mixgrpo.plugins.rewards.remote import RemoteReward, RunningServer, make_app
from mixgrpo.plugins.rewards.scorer_adapters import (
    GenEvalReward,
    OCRReward,
    levenshtein,
    ocr_score,
    relative_position,
)
from mixgrpo.testing.rewards import RewardContract


def flat(levels: list[int], size: int = 32) -> torch.Tensor:
    """Flat grey images whose 8-bit level selects the stand-in scorer's answer."""
    return torch.stack([torch.full((3, size, size), v / 255.0) for v in levels])


def line(text: str, confidence: float) -> list:
    return [[[0, 0], [10, 0], [10, 5], [0, 5]], (text, confidence)]


# -- OCR -------------------------------------------------------------------------------------------------

#: the stand-in OCR's answers (PaddleOCR's format), by image level
OCR_ANSWERS = {
    10: [[line("Hello", 0.98), line("World", 0.91)]],          # exact, over two lines
    20: [[line("HeloWorld", 0.9)]],                              # one deletion
    30: [[line("xx HELLO WORLD yy", 0.7)]],                      # contains the target
    40: [None],                                                  # nothing found
    50: [[line("completely unrelated long text", 0.9)]],         # capped at the target's length
    60: [[line("Hello", 0.9), line("World", 0.0)]],              # a zero-confidence line is dropped
}


def fake_ocr(image: np.ndarray):
    level = int(image[0, 0, 0])
    if level == 99:
        raise RuntimeError("paddle crashed")
    return OCR_ANSWERS[level]


@cache
def _distance(a: str, b: str) -> int:
    """Edit distance by its recursive definition: an independent reference for the iterative one."""
    if not a or not b:
        return len(a) + len(b)
    return min(_distance(a[1:], b) + 1, _distance(a, b[1:]) + 1, _distance(a[1:], b[1:]) + (a[0] != b[0]))


def test_levenshtein_equals_the_recursive_definition():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 8)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 8)))
        assert levenshtein(a, b) == _distance(a, b)
    assert levenshtein("kitten", "sitting") == 3


def test_ocr_scores_follow_flow_grpos_formula():
    prompt = 'a neon sign that says "Hello World" at night'
    got = OCRReward(scorer=fake_ocr)(flat([10, 20, 30, 40, 50, 60]), [prompt] * 6)
    # target "helloworld" (10 characters): exact 1; one edit 0.9; substring 1; nothing 0; capped 0;
    # "hello" alone is 5 edits away: 0.5
    np.testing.assert_allclose(got.numpy(), [1.0, 0.9, 1.0, 0.0, 0.0, 0.5], atol=1e-7)
    assert ocr_score("HeloWorld", "Hello World") == pytest.approx(0.9)


def test_an_ocr_failure_is_masked_not_zero():
    with pytest.warns(RuntimeWarning, match=r"OCR failed on 1 of 2 images \(first: RuntimeError: paddle crashed\)"):
        got = OCRReward(scorer=fake_ocr)(flat([99, 10]), ['"Hello World"'] * 2)
    assert got[0].isnan() and got[1].item() == 1.0


def test_an_ocr_prompt_without_quoted_text_is_refused():
    with pytest.raises(ValueError, match=r"has no target text in double quotes"):
        OCRReward(scorer=fake_ocr)(flat([10]), ["a neon sign that says Hello"])
    with pytest.raises(ValueError, match=r"has no target text"):
        OCRReward(scorer=fake_ocr)(flat([10]), ['a sign saying " "'])


def test_without_paddleocr_the_error_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # as if not installed, wherever this runs
    with pytest.raises(ImportError, match=r"OCRReward needs paddleocr .*serve-reward"):
        OCRReward()


# -- GenEval ---------------------------------------------------------------------------------------------

CLASSES = ["cat", "dog", "car", "bench", "person"]
RECORDS = [
    {"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]},
    {"tag": "counting", "prompt": "a photo of three dogs", "include": [{"class": "dog", "count": 3}]},
    {"tag": "colors", "prompt": "a photo of a red car", "include": [{"class": "car", "count": 1, "color": "red"}]},
    {"tag": "colors", "prompt": "a photo of a blue car", "include": [{"class": "car", "count": 1, "color": "blue"}]},
    {"tag": "position", "prompt": "a photo of a dog right of a cat",
     "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]},
    {"tag": "two_object", "prompt": "a photo of a cat and a bench",
     "include": [{"class": "cat", "count": 1}, {"class": "bench", "count": 1}]},
    {"tag": "counting", "prompt": "a photo of two cats", "include": [{"class": "cat", "count": 2}],
     "exclude": [{"class": "cat", "count": 3}]},
]


def scene(**objects) -> list[np.ndarray]:
    """An mmdet 2.x box result: per class of CLASSES an ``[N, 5]`` array (x1, y1, x2, y2, confidence)."""
    return [np.array(objects.get(name, []), dtype=np.float32).reshape(-1, 5) for name in CLASSES]


SCENES = {
    10: scene(cat=[[10, 10, 20, 20, 0.95]]),
    20: scene(dog=[[0, 0, 5, 5, 0.95], [6, 0, 9, 5, 0.92], [10, 0, 15, 5, 0.85], [16, 0, 20, 5, 0.5]]),
    30: scene(car=[[5, 5, 25, 25, 0.8]]),
    40: scene(cat=[[0, 0, 10, 10, 0.9]], dog=[[30, 0, 40, 10, 0.9]]),       # the dog right of the cat
    50: scene(cat=[[30, 0, 40, 10, 0.9]], dog=[[0, 0, 10, 10, 0.9]]),       # the dog left of the cat
    60: scene(cat=[[0, 0, 5, 5, 0.9], [10, 0, 15, 5, 0.8]], bench=[[0, 10, 30, 20, 0.7]]),
    70: scene(cat=[[0, 0, 5, 5, 0.95], [6, 0, 9, 5, 0.94], [10, 0, 15, 5, 0.93]]),
}


def fake_detector(arrays):
    return [(SCENES[int(a[0, 0, 0])], None) for a in arrays]


def fake_colours(image, objects, name):
    assert image.dtype == np.uint8 and image.ndim == 3
    return ["blue" for _ in objects]  # every car of these scenes is blue


@pytest.fixture(scope="module")
def geneval_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    (root / "object_names.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return root / "metadata.jsonl", root / "object_names.txt"


def _geneval(files, mode="score"):
    metadata, names = files
    return GenEvalReward(str(metadata), str(names), mode=mode, detector=fake_detector, color_classifier=fake_colours)


# (image level, prompt) → (score, strict, correct), each derived by hand from the rules in the module docstring
CASES = [
    (10, "a photo of a cat", 1.0, 1.0, 1.0),
    (20, "a photo of three dogs", 1 - 1 / 3, 0.0, 0.0),      # 2 dogs above the counting threshold 0.9
    (30, "a photo of a red car", 0.5, 0.0, 0.0),             # count 1, colour 0
    (30, "a photo of a blue car", 1.0, 1.0, 1.0),
    (40, "a photo of a dog right of a cat", 1.0, 1.0, 1.0),  # cat 1, dog 1, position 1
    (50, "a photo of a dog right of a cat", 0.75, 0.0, 0.0),  # cat 1, dog 1, position 0 and 1
    (60, "a photo of a cat and a bench", 0.5, 0.0, 1.0),      # 2 cats for 1: 0; GenEval needs >= 1
    (70, "a photo of two cats", 0.5, 0.0, 0.0),               # 3 cats for 2; the exclude fails GenEval
    (10, "a photo of a dog right of a cat", 1 / 3, 0.0, 0.0),  # no dog: 1, 0 and 0 for the position
]


@pytest.mark.parametrize("mode, column", [("score", 2), ("strict", 3), ("correct", 4)])
def test_geneval_scores_follow_the_rules(geneval_files, mode, column):
    reward = _geneval(geneval_files, mode)
    got = reward(flat([c[0] for c in CASES]), [c[1] for c in CASES])
    np.testing.assert_allclose(got.numpy(), [c[column] for c in CASES], atol=1e-6)


def test_relative_position():
    cat, right, below, overlapping = [0, 0, 10, 10], [30, 0, 40, 10], [0, 30, 10, 40], [1, 1, 11, 11]
    assert relative_position(np.array(right), np.array(cat)) == {"right of"}
    assert relative_position(np.array(cat), np.array(right)) == {"left of"}
    assert relative_position(np.array(below), np.array(cat)) == {"below"}
    assert relative_position(np.array([30, 30, 40, 40]), np.array(cat)) == {"right of", "below"}
    assert relative_position(np.array(overlapping), np.array(cat)) == set()


def test_unknown_prompts_and_bad_metadata_are_refused(geneval_files, tmp_path, monkeypatch):
    reward = _geneval(geneval_files)
    with pytest.raises(ValueError, match="1 prompt\\(s\\) have no record in the metadata file, e.g. 'a horse'"):
        reward(flat([10]), ["a horse"])
    _, names = geneval_files
    bad = {"tag": "position", "prompt": "p", "include": [{"class": "cat", "count": 1, "position": ["near", 0]}]}
    for record, message in [({**RECORDS[0], "tag": "scenes"}, "tag 'scenes' is not one of"),
                            ({**RECORDS[0], "include": [{"class": "horse", "count": 1}]}, "'class' must be one of"),
                            ({**RECORDS[0], "include": [{"class": "cat", "count": 0}]}, "'count' must be an integer"),
                            (bad, "'position' must be"),
                            ({**RECORDS[2], "include": [{"class": "car", "count": 1, "color": "teal"}]}, "'color'")]:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(RECORDS[1]) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
            GenEvalReward(str(path), str(names), detector=fake_detector)
    monkeypatch.setitem(sys.modules, "mmdet", None)  # metadata first, then the missing package by name
    with pytest.raises(ImportError, match=r"GenEvalReward needs mmdet 2\.x"):
        GenEvalReward(str(geneval_files[0]), str(names))


def test_colour_prompts_need_a_colour_classifier(geneval_files):
    metadata, names = geneval_files
    reward = GenEvalReward(str(metadata), str(names), detector=fake_detector)
    assert reward(flat([10]), ["a photo of a cat"]).item() == 1.0
    with pytest.raises(ValueError, match="color_classifier is not set"):
        reward(flat([30]), ["a photo of a red car"])


# -- through serve-reward's app ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ocr", "geneval"])
def test_served_scores_equal_the_local_ones(which, geneval_files):
    if which == "ocr":
        local, levels, prompts = OCRReward(scorer=fake_ocr), [10, 20, 60], ['"Hello World"'] * 3
    else:
        local, levels, prompts = _geneval(geneval_files), [c[0] for c in CASES], [c[1] for c in CASES]
    server = RunningServer(make_app(local, which))
    try:
        got = RemoteReward(url=server.url, reward=which, batch_size=4)(flat(levels), prompts)
    finally:
        server.stop()
    assert torch.equal(got, local(flat(levels), prompts))
    assert (got.max() - got.min()).item() > 0.1


def test_registered_by_name():
    pm = PluginManager()
    assert isinstance(pm.create("reward", "ocr", scorer=fake_ocr), OCRReward)


# -- the contract ------------------------------------------------------------------------------------------


def text_from_pixels(image: np.ndarray):
    """A stand-in OCR whose reading depends on the image: brighter images read closer to the target."""
    return [[line("Hello World"[: 3 + int(image.mean()) % 9], 0.9)]]


def counting_detector(arrays):
    """A stand-in detector whose cat count follows the image's mean level."""
    return [scene(cat=[[i * 6, 0, i * 6 + 5, 5, 0.95] for i in range(1 + int(a.mean()) % 3)]) for a in arrays]


class TestOCRContract(RewardContract):
    def make_reward(self):
        return OCRReward(scorer=text_from_pixels)

    def make_inputs(self):
        images, _ = super().make_inputs()
        return images, ['a sign that says "Hello World"', 'a card with "Hello"', 'graffiti: "Hello Wor"',
                        '"HELLO world" in chalk']


class TestGenEvalContract(RewardContract):
    @pytest.fixture(autouse=True)
    def _files(self, geneval_files):
        self.files = geneval_files

    def make_reward(self):
        metadata, names = self.files
        return GenEvalReward(str(metadata), str(names), detector=counting_detector)

    def make_inputs(self):
        images, _ = super().make_inputs()
        return images, ["a photo of a cat", "a photo of two cats", "a photo of a cat", "a photo of two cats"]


# -- GenEval's colour classifier on a tiny random open_clip CLIP --------------------------------------------


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    from .reward_refs import TINY_OPEN_CLIP, load_torchvision, perturb

    load_torchvision()
    import open_clip

    root = tmp_path_factory.mktemp("colours")
    config = root / "ColourTiny.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(9)
    model = open_clip.create_model("ColourTiny", pretrained=None)
    perturb(model, 9, std=0.2)
    torch.save(model.state_dict(), root / "clip.pt")
    return root / "clip.pt", config


def test_clip_colours_equal_a_float64_rederivation(tiny_open_clip):
    import open_clip
    from PIL import Image

    from mixgrpo.plugins.rewards.scorer_adapters import COLORS, ClipColours

    ckpt, config = tiny_open_clip
    colours = ClipColours(str(ckpt), str(config))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    masks = [rng.random((64, 80)) > 0.5, None, np.zeros((64, 80), bool)]
    boxes = [np.array([4, 6, 40, 50, 0.9]), np.array([10.4, 0, 70.6, 30, 0.8]), np.array([0, 0, 80, 64, 0.7])]
    got = colours(image, list(zip(boxes, masks)), "car")

    model = open_clip.create_model("ColourTiny", pretrained=str(ckpt)).double().eval()
    _, _, transform = open_clip.create_model_and_transforms("ColourTiny", pretrained=str(ckpt))
    tokenizer = open_clip.get_tokenizer("ColourTiny")
    with torch.no_grad():
        columns = []
        for c in COLORS:  # clip_benchmark's zero-shot classifier: mean of unit template embeddings, renormalised
            texts = [f"a photo of a {c} car", f"a photo of a {c}-colored car", f"a photo of a {c} object"]
            e = model.encode_text(tokenizer(texts))
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            columns.append(e / e.norm())
        classifier = torch.stack(columns, 1)
        np.testing.assert_allclose(colours.classifier("car").numpy(), classifier.numpy(), atol=1e-5)
        crops = []
        for (x1, y1, x2, y2, _), mask in zip(boxes, masks):
            pixels = image if mask is None else np.where(mask[..., None], image, 153).astype(np.uint8)
            crops.append(transform(Image.fromarray(pixels[round(y1):round(y2), round(x1):round(x2)])))
        f = model.encode_image(torch.stack(crops).double())
        logits = (f / f.norm(dim=-1, keepdim=True)) @ classifier
    assert got == [COLORS[i] for i in logits.argmax(1)]
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # the decisions are not ties that rounding could flip


def test_geneval_builds_the_colour_classifier_from_clip_checkpoint(geneval_files, tiny_open_clip):
    from mixgrpo.plugins.rewards.scorer_adapters import ClipColours

    ckpt, config = tiny_open_clip
    metadata, names = geneval_files
    reward = GenEvalReward(str(metadata), str(names), detector=fake_detector, clip_checkpoint=str(ckpt),
                           clip_arch=str(config), device="cpu")
    assert isinstance(reward.color_classifier, ClipColours)
    score = reward(flat([30]), ["a photo of a red car"]).item()
    assert score in (0.5, 1.0)  # count 1, then whatever the random CLIP calls the car's colour
