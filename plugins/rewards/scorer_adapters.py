"""GenEval and OCR scorers as reward plugins for `mixgrpo serve-reward`.

Their scorers need packages that do not share an environment with training (GenEval: mmdet 2.x on
mmcv-full 1.x, plus open_clip; OCR: paddleocr on paddlepaddle), so each reward builds its scorer
only when constructed, and a missing package is an ``ImportError`` naming it. Install that package
in its own environment next to mixgrpo and serve the reward from there::

    mixgrpo serve-reward ocr --port 8702
    mixgrpo serve-reward geneval --port 8703 --gin "GenEvalReward.metadata = '/data/geneval/train_metadata.jsonl'" ...

then train with ``RemoteReward.url`` (and ``RemoteReward.reward = 'ocr'``). The scorer is an argument
(``scorer`` / ``detector`` and ``color_classifier``), so tests and other back ends inject a callable
that answers in the package's output format.

**OCR** (flow_grpo, ``flow_grpo/ocr.py``): the target is the text between the first pair of double
quotes of the prompt; PaddleOCR's recognised lines with confidence > 0 are joined, spaces removed and
lower-cased on both sides; d = 0 when the target occurs in the recognised text, else the Levenshtein
distance, capped at the target's length; the score is ``1 − d / len(target)``. Where flow_grpo scores
an OCR failure 0, it is NaN here (masked).

**GenEval** (Ghosh et al. 2023, djghosh13/geneval; flow_grpo's reward server, yifan123/reward-server
``reward_server/gen_eval.py``): each prompt has a metadata record (a line of GenEval's JSONL)::

    {"tag": "color_attr", "prompt": "a photo of a red car and a blue bench",
     "include": [{"class": "car", "count": 1, "color": "red"},
                 {"class": "bench", "count": 1, "color": "blue", "position": ["right of", 0]}],
     "exclude": [{"class": "car", "count": 2}]}

``tag`` is one of single_object, two_object, counting, colors, position, color_attr; ``position`` is
``[relation, index of an earlier include]`` with relation left of / right of / above / below. The
detector (Mask2Former) gives boxes per class; those above 0.3 confidence (0.9 for counting) are kept,
most confident first, at most 16 per class. ``mode`` picks the score:

* ``"score"`` (default; what flow_grpo trains on): the mean of partial credits, one per include of
  ``1 − |count − found| / count``, one per colour check of ``1 − |count − right colour| / count``
  (0 when the count is already wrong), one per position check (0 when the count is wrong or the
  target group failed; a failed relation adds 0 and then 1, as the reward server does); excludes
  are not scored.
* ``"strict"``: 1 when every include is found exactly ``count`` times with its colour and position.
* ``"correct"``: GenEval's benchmark correctness: at least ``count`` (the most confident ones are
  checked for colour and position), and no exclude reaching its count.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Reward
from mixgrpo.plugins.rewards.preprocess import check_batch, to_uint8_levels

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MODES = ("score", "strict", "correct")


def uint8_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """Float images ``[B, 3, H, W]`` in [0, 1] → ``H×W×3`` uint8 arrays, as the samples are saved."""
    return list(to_uint8_levels(images).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def _missing(package: str, who: str, what: str) -> ImportError:
    return ImportError(f"{who} needs {package} ({what}); it is not installed in this environment. Install it in an "
                       f"environment of its own and run `mixgrpo serve-reward` there, or pass a scorer callable "
                       f"(docs/rewards.md, 'Scorer adapters')")


# -- OCR -----------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_target(prompt: str) -> str:
    """The quoted text of an OCR prompt (``a sign that says "Open 24 hours"`` → ``Open 24 hours``)."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(f'OCRReward: the prompt {prompt!r} has no target text in double quotes; OCR prompts name '
                         f'the text to render, e.g. \'a neon sign saying "Open 24 hours"\'')
    return parts[1]


def recognised_text(result) -> str:
    """PaddleOCR's ``ocr(img)`` result ``[[[box, (text, confidence)], ...]]`` (``[None]`` when nothing
    was found) → the lines with confidence > 0, joined."""
    page = result[0] if result else None
    return "".join(text for _, (text, confidence) in page if confidence > 0) if page else ""


def ocr_score(recognised: str, target: str) -> float:
    """flow_grpo's OCR reward: ``1 − min(d, len(target)) / len(target)``, d = 0 for a substring."""
    seen, want = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    distance = 0 if want in seen else min(levenshtein(seen, want), len(want))
    return 1.0 - distance / len(want)


def _paddle_ocr(use_gpu: bool, lang: str) -> Callable[[np.ndarray], object]:
    try:
        from paddleocr import PaddleOCR
    except ImportError as exc:
        raise _missing("paddleocr (and paddlepaddle; flow_grpo uses paddleocr 2.x)", "OCRReward",
                       "pip install paddlepaddle paddleocr") from exc
    ocr = PaddleOCR(use_angle_cls=False, lang=lang, use_gpu=use_gpu, show_log=False)
    return lambda image: ocr.ocr(image, cls=False)


class OCRReward(Reward):
    """How well the image renders the prompt's quoted text (flow_grpo's OCR task), in [0, 1].

    Args:
        scorer: ``H×W×3 uint8 → PaddleOCR.ocr result``; default: PaddleOCR 2.x (``use_angle_cls=False``).
        use_gpu, lang: of the default PaddleOCR.
    """

    name = "ocr"
    version = "flow_grpo-ocr"

    def __init__(self, scorer: Callable | None = None, use_gpu: bool = False, lang: str = "en") -> None:
        self.scorer = scorer if scorer is not None else _paddle_ocr(use_gpu, lang)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → ``[B]`` float32; NaN where the OCR failed."""
        targets = [ocr_target(p) for p in check_batch(images, prompts, type(self).__name__)]
        scores, failures = [], []
        for image, target in zip(uint8_arrays(images), targets):
            try:
                scores.append(ocr_score(recognised_text(self.scorer(image)), target))
            except Exception as exc:  # one image's OCR failure is that image's NaN, not a 0
                failures.append(f"{type(exc).__name__}: {exc}")
                scores.append(math.nan)
        if failures:
            warnings.warn(f"OCRReward: the OCR failed on {len(failures)} of {len(scores)} images (first: "
                          f"{failures[0]}); they score NaN and are masked out", RuntimeWarning, stacklevel=2)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


# -- GenEval ---------------------------------------------------------------------------------------------


def _check_record(record, where: str, classes: set[str]) -> dict:
    """One metadata record, validated; errors name ``where`` (file and line) and the field."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"{where}: expected a JSON object with a 'prompt' string")
    if record.get("tag") not in TAGS:
        raise ValueError(f"{where}: tag {record.get('tag')!r} is not one of {TAGS}")
    includes = record.get("include")
    if not isinstance(includes, list) or not includes:
        raise ValueError(f"{where}: 'include' must be a non-empty list of {{'class', 'count', ...}}")
    for k, req in enumerate(includes + list(record.get("exclude", []))):
        what = f"{where}: {'include' if k < len(includes) else 'exclude'} {req!r}"
        if not isinstance(req, dict) or req.get("class") not in classes:
            raise ValueError(f"{what}: 'class' must be one of the detector's object names")
        if isinstance(req.get("count"), bool) or not isinstance(req.get("count"), int) or req["count"] < 1:
            raise ValueError(f"{what}: 'count' must be an integer >= 1")
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"{what}: 'color' must be one of {COLORS}")
        if "position" in req:
            pos = req["position"]
            if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)
                    and 0 <= pos[1] < k):
                raise ValueError(f"{what}: 'position' must be [relation in {RELATIONS}, index of an earlier include]")
    return record


def load_metadata(path: Path, classes: set[str]) -> dict[str, dict]:
    """GenEval's JSONL metadata, keyed by prompt (a prompt listed twice must have one record)."""
    out: dict[str, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        record = _check_record(record, f"{path}:{n}", classes)
        if out.setdefault(record["prompt"], record) != record:
            raise ValueError(f"{path}:{n}: the prompt {record['prompt']!r} is listed twice with different metadata")
    if not out:
        raise ValueError(f"{path} holds no metadata records")
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` pixel boxes (inclusive pixels, hence the +1, as GenEval)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: np.ndarray, box_b: np.ndarray, threshold: float = 0.1) -> set[str]:
    """Where A is relative to B: the centre offset, shrunk by ``threshold`` × the two boxes' summed
    sizes on each axis, as a unit direction; a component beyond ±0.5 names a relation (image y grows down)."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    names = ((dx < -0.5, "left of"), (dx > 0.5, "right of"), (dy < -0.5, "above"), (dy > 0.5, "below"))
    return {name for holds, name in names if holds}


def _load_detector(config: str | None, checkpoint: str | None, device: str) -> Callable:
    try:
        from mmdet.apis import inference_detector, init_detector
    except ImportError as exc:
        raise _missing("mmdet 2.x (with mmcv-full 1.x, as GenEval's environment)", "GenEvalReward",
                       "see djghosh13/geneval's install steps") from exc
    from mixgrpo.plugins.rewards.models import local_path

    model = init_detector(str(local_path(config, "GenEvalReward.detector_config", file=True)),
                          str(local_path(checkpoint, "GenEvalReward.detector_checkpoint", file=True)), device=device)
    return lambda arrays: inference_detector(model, list(arrays))


class ClipColours:
    """GenEval's colour classifier: CLIP zero-shot over ``COLORS``. A class's classifier averages the
    normalised text embeddings of three templates per colour (clip_benchmark's zero-shot classifier);
    each object is its mask's pixels over grey (#999999), cropped to its box, prepared by open_clip's
    evaluation transform; the colour is the argmax of the cosine.

    Args:
        checkpoint: local path of the CLIP weights (GenEval: OpenAI's ViT-L-14, as open_clip loads it).
        arch: open_clip model name, or the path of an open_clip model-config JSON.
        device: where CLIP runs.
    """

    def __init__(self, checkpoint: str, arch: str = "ViT-L-14", device: str = "cpu") -> None:
        try:
            import open_clip
        except ImportError as exc:
            raise _missing("open_clip (and torchvision)", "GenEvalReward's colour classifier",
                           "pip install -e '.[rewards]'") from exc
        from mixgrpo.plugins.rewards.models import local_path

        path = local_path(checkpoint, "GenEvalReward.clip_checkpoint", file=True)
        if arch.endswith(".json"):
            config = local_path(arch, "GenEvalReward.clip_arch", file=True)
            open_clip.add_model_config(config)
            arch = config.stem
        self.model, _, self.transform = open_clip.create_model_and_transforms(arch, pretrained=str(path), device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer, self.device = open_clip.get_tokenizer(arch), torch.device(device)
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def classifier(self, name: str) -> torch.Tensor:
        """``[D, len(COLORS)]`` unit text embeddings of the colours of class ``name``."""
        if name not in self._classifiers:
            templates = (f"a photo of a {{c}} {name}", f"a photo of a {{c}}-colored {name}", "a photo of a {c} object")
            columns = []
            for colour in COLORS:
                tokens = self.tokenizer([t.format(c=colour) for t in templates]).to(self.device)
                mean = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).mean(0)
                columns.append(mean / mean.norm())
            self._classifiers[name] = torch.stack(columns, dim=1)
        return self._classifiers[name]

    @staticmethod
    def crop(image: np.ndarray, box: np.ndarray, mask) -> object:
        """One object's pixels over grey (the whole image without a mask), cropped to its box (PIL)."""
        from PIL import Image

        picture = Image.fromarray(image)
        if mask is not None:
            grey = Image.new("RGB", picture.size, color="#999")
            picture = Image.composite(picture, grey, Image.fromarray(np.asarray(mask, dtype=bool)))
        return picture.crop(tuple(float(v) for v in box[:4]))

    @torch.no_grad()
    def __call__(self, image: np.ndarray, objects: list, name: str) -> list[str]:
        pixels = torch.stack([self.transform(self.crop(image, box, mask)) for box, mask in objects]).to(self.device)
        features = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return [COLORS[int(i)] for i in (features @ self.classifier(name)).argmax(dim=1)]


class GenEvalReward(Reward):
    """GenEval's compositional score of each image against its prompt's metadata (see the module).

    Args:
        metadata: local path of GenEval's JSONL metadata (``evaluation_metadata.jsonl`` or flow_grpo's
            ``train_metadata.jsonl``); every scored prompt must have a record.
        object_names: local path of GenEval's ``object_names.txt`` (the detector's classes, in order).
        mode: ``"score"`` (partial credit, flow_grpo's training reward), ``"strict"`` or ``"correct"``.
        detector: ``list of H×W×3 uint8 → list of mmdet 2.x results`` (per image, per class an
            ``[N, 5]`` array of x1, y1, x2, y2, confidence, optionally with per-class masks:
            ``(boxes, masks)``); default: ``init_detector(detector_config, detector_checkpoint)``.
        color_classifier: ``(H×W×3 uint8, [(box, mask)], class name) → colour names`` (one per object,
            from ``COLORS``); needed only by prompts with a colour. GenEval's is CLIP ViT-L-14 zero-shot
            on each object cropped over grey: ``ClipColours``, built when ``clip_checkpoint`` is bound.
        clip_checkpoint, clip_arch: the CLIP of the default colour classifier (local weights).
        threshold, counting_threshold, max_objects, nms_threshold, position_threshold: GenEval's
            detection settings (0.3, 0.9, 16, 1.0 = no suppression, 0.1).
    """

    name = "geneval"
    version = "geneval-rewardserver"

    def __init__(self, metadata: str | None = None, object_names: str | None = None, mode: str = "score",
                 detector: Callable | None = None, color_classifier: Callable | None = None,
                 detector_config: str | None = None, detector_checkpoint: str | None = None,
                 clip_checkpoint: str | None = None, clip_arch: str = "ViT-L-14", device: str = "cuda",
                 threshold: float = 0.3, counting_threshold: float = 0.9, max_objects: int = 16,
                 nms_threshold: float = 1.0, position_threshold: float = 0.1) -> None:
        from mixgrpo.plugins.rewards.models import local_path

        if mode not in MODES:
            raise ValueError(f"GenEvalReward.mode must be one of {MODES}, got {mode!r}")
        names = local_path(object_names, "GenEvalReward.object_names", file=True).read_text().splitlines()
        self.classes = [n.strip() for n in names if n.strip()]
        self.metadata = load_metadata(local_path(metadata, "GenEvalReward.metadata", file=True), set(self.classes))
        self.mode, self.color_classifier = mode, color_classifier
        self.threshold, self.counting_threshold, self.max_objects = threshold, counting_threshold, int(max_objects)
        self.nms_threshold, self.position_threshold = nms_threshold, position_threshold
        self.version = f"{self.version}-{mode}"
        # the metadata is checked before the detector loads: a wrong file fails in seconds, not minutes
        if color_classifier is None and clip_checkpoint is not None:
            self.color_classifier = ClipColours(clip_checkpoint, clip_arch, device)
        self.detector = detector if detector is not None else _load_detector(detector_config, detector_checkpoint,
                                                                             device)

    def detections(self, result, tag: str) -> dict[str, list[tuple[np.ndarray, object]]]:
        """One image's mmdet result → ``{class: [(box row, mask or None), ...]}``, most confident first."""
        boxes, masks = result if isinstance(result, tuple) else (result, None)
        if len(boxes) != len(self.classes):
            raise ValueError(f"the detector gave {len(boxes)} classes; object_names lists {len(self.classes)}")
        floor = self.counting_threshold if tag == "counting" else self.threshold
        found: dict[str, list] = {}
        for index, name in enumerate(self.classes):
            rows = np.asarray(boxes[index], dtype=np.float64).reshape(-1, 5)
            # GenEval's own ordering call, so that ties between confidences break the same way
            order = [int(i) for i in np.argsort(rows[:, 4])[::-1] if rows[i, 4] > floor][: self.max_objects]
            kept = []
            while order:
                best = order.pop(0)
                kept.append((rows[best], None if masks is None else masks[index][best]))
                if self.nms_threshold < 1:
                    order = [i for i in order if box_iou(rows[best], rows[i]) < self.nms_threshold]
            if kept:
                found[name] = kept
        return found

    def _colours(self, image: np.ndarray, objects: list, name: str) -> list[str]:
        if self.color_classifier is None:
            raise ValueError("GenEvalReward.color_classifier is not set, and this prompt checks a colour")
        return list(self.color_classifier(image, objects, name))

    def _related(self, objects: list, targets: list, relation: str) -> bool:
        return all(relation in relative_position(o[0], t[0], self.position_threshold) for o in objects for t in targets)

    def partial(self, image: np.ndarray, found: dict, record: dict) -> tuple[float, bool]:
        """``(partial score, strict correctness)`` of one image, as the reward server's ``evaluate_reward``."""
        credits: list[float] = []
        strict, groups = True, []
        for req in record["include"]:
            objects, count = found.get(req["class"], []), req["count"]
            credits.append(1 - abs(count - len(objects)) / count)
            matched = len(objects) == count
            if not matched and ("color" in req or "position" in req):
                credits.append(0.0)
            if matched and "color" in req:
                right = self._colours(image, objects, req["class"]).count(req["color"])
                credits.append(1 - abs(count - right) / count)
                matched = right == count
            if matched and "position" in req:
                relation, target = req["position"]
                if groups[target] is None:
                    credits.append(0.0)
                    matched = False
                else:
                    matched = self._related(objects, groups[target], relation)
                    credits.extend([1.0] if matched else [0.0, 1.0])  # the server's half credit on a failed relation
            strict = strict and matched
            groups.append(objects if matched else None)
        return (sum(credits) / len(credits) if credits else 0.0), strict

    def correct(self, image: np.ndarray, found: dict, record: dict) -> bool:
        """GenEval's benchmark correctness (``evaluate`` in its evaluate_images.py)."""
        ok, groups = True, []
        for req in record["include"]:
            objects = found.get(req["class"], [])[: req["count"]]
            matched = len(objects) >= req["count"]
            if matched and "color" in req:
                matched = self._colours(image, objects, req["class"]).count(req["color"]) >= req["count"]
            if matched and "position" in req:
                relation, target = req["position"]
                matched = groups[target] is not None and self._related(objects, groups[target], relation)
            ok = ok and matched
            groups.append(objects if matched else None)
        return ok and all(len(found.get(req["class"], [])) < req["count"] for req in record.get("exclude", []))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → ``[B]`` float32 scores (see ``mode``)."""
        prompts = check_batch(images, prompts, type(self).__name__)
        unknown = [p for p in prompts if p not in self.metadata]
        if unknown:
            raise ValueError(f"GenEvalReward: {len(unknown)} prompt(s) have no record in the metadata file, e.g. "
                             f"{unknown[0]!r}: train on the prompts of that file")
        arrays = uint8_arrays(images)
        results = list(self.detector(arrays)) if arrays else []
        if len(results) != len(arrays):
            raise ValueError(f"the detector gave {len(results)} results for {len(arrays)} images")
        scores = []
        for image, result, prompt in zip(arrays, results, prompts):
            record = self.metadata[prompt]
            found = self.detections(result, record["tag"])
            if self.mode == "correct":
                scores.append(float(self.correct(image, found, record)))
            else:
                score, strict = self.partial(image, found, record)
                scores.append(score if self.mode == "score" else float(strict))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


@hookimpl
def register_rewards(register):
    register("ocr", OCRReward)
    register("geneval", GenEvalReward)
