"""The shapes world's scenes: the vocabulary, scene specs and their prompts (both ways), the catalogue
of distinct scenes per level and its fixed train/eval split, and seeded sampling of specs and prompts."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import attrs
import numpy as np

IMAGE_SIZE = 32
KINDS = ("circle", "square", "triangle")
#: saturated colours whose chromaticities (colour / max channel) stay far apart after blurring
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND = (0.0, 0.0, 0.0)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
LEVELS = (1, 2, 3, 4)
SPLITS = ("train", "eval")
EVAL_FRACTION = 0.2
SIZE_RANGE = (7.0, 11.0)  # object bounding-box side in pixels
SUPERSAMPLE = 4


# -- specs and prompts ------------------------------------------------------------------------------
@attrs.frozen
class ObjectSpec:
    """``count`` objects of one ``kind`` and ``colour``."""

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    colour: str = attrs.field(validator=attrs.validators.in_(tuple(COLOURS)))
    count: int = attrs.field(default=1, validator=attrs.validators.in_(tuple(COUNT_WORDS)))


@attrs.frozen
class SceneSpec:
    """One or two objects, and for two objects optionally ``objects[0] <relation> objects[1]``.

    Two objects always have different colours and count 1 (colour is how the checker tells them apart).
    """

    objects: tuple[ObjectSpec, ...] = attrs.field(converter=tuple)
    relation: str | None = None

    def __attrs_post_init__(self) -> None:
        n = len(self.objects)
        if n not in (1, 2):
            raise ValueError(f"a scene has one or two objects, got {n}")
        if self.relation is not None and (self.relation not in RELATIONS or n != 2):
            raise ValueError(f"relation {self.relation!r} needs two objects and one of {RELATIONS}")
        if n == 2:
            a, b = self.objects
            if a.count != 1 or b.count != 1 or a.colour == b.colour:
                raise ValueError(f"two-object scenes need single objects of different colours, got "
                                 f"{_object_phrase(a)!r} and {_object_phrase(b)!r}")

    @property
    def level(self) -> int:
        """1 one object, 2 counting, 3 two objects, 4 relative position."""
        if len(self.objects) == 2:
            return 4 if self.relation else 3
        return 1 if self.objects[0].count == 1 else 2


def _object_phrase(obj: ObjectSpec) -> str:
    return f"{COUNT_WORDS[obj.count]} {obj.colour} {obj.kind}{'s' if obj.count > 1 else ''}"


def prompt_of(spec: SceneSpec) -> str:
    """The prompt of a scene, e.g. ``"a red circle left of a blue triangle"``."""
    phrases = [_object_phrase(o) for o in spec.objects]
    if len(phrases) == 1:
        return phrases[0]
    return f" {spec.relation or 'and'} ".join(phrases)


def _parse_object(words: list[str], text: str) -> ObjectSpec:
    counts = {w: n for n, w in COUNT_WORDS.items()}
    if len(words) != 3:
        raise ValueError(f"cannot parse prompt {text!r}: expected '<count> <colour> <kind>', got {' '.join(words)!r}")
    count_word, colour, noun = words
    if count_word not in counts:
        raise ValueError(f"cannot parse prompt {text!r}: unknown count word {count_word!r}; "
                         f"expected one of {', '.join(counts)}")
    if colour not in COLOURS:
        raise ValueError(f"cannot parse prompt {text!r}: unknown colour {colour!r}; colours: {', '.join(COLOURS)}")
    count = counts[count_word]
    nouns = {k + "s" if count > 1 else k: k for k in KINDS}
    if noun not in nouns:
        form = "plural" if count > 1 else "singular"
        raise ValueError(f"cannot parse prompt {text!r}: expected a {form} kind after {count_word!r} "
                         f"({', '.join(nouns)}), got {noun!r}")
    return ObjectSpec(nouns[noun], colour, count)


def _find_link(words: list[str], text: str) -> tuple[int, int, str | None] | None:
    """Position, width in words and relation of the word(s) joining two objects, if any."""
    for i, word in enumerate(words):
        if word in ("and", "above", "below"):
            return i, 1, None if word == "and" else word
        if word in ("left", "right"):
            if words[i + 1: i + 2] != ["of"]:
                raise ValueError(f"cannot parse prompt {text!r}: expected 'of' after {word!r}")
            return i, 2, f"{word} of"
    return None


def parse_prompt(text: str) -> SceneSpec:
    """The exact inverse of ``prompt_of`` (case and extra whitespace are ignored).

    Raises:
        ValueError: naming the word that is outside the grammar, or the rule a scene breaks.
    """
    words = text.strip().lower().split()
    if not words:
        raise ValueError("cannot parse an empty prompt")
    unknown = [w for w in words if w not in _VOCABULARY]
    if unknown:
        raise ValueError(f"cannot parse prompt {text!r}: unknown word {unknown[0]!r}; "
                         f"the shapes grammar knows: {', '.join(sorted(_VOCABULARY))}")
    link = _find_link(words, text)
    if link is None:
        return SceneSpec((_parse_object(words, text),))
    i, width, relation = link
    objects = (_parse_object(words[:i], text), _parse_object(words[i + width:], text))
    try:
        return SceneSpec(objects, relation)
    except ValueError as err:
        raise ValueError(f"cannot parse prompt {text!r}: {err}") from None


_VOCABULARY = frozenset(
    {*COUNT_WORDS.values(), *COLOURS, *KINDS, *(k + "s" for k in KINDS), "and", *" ".join(RELATIONS).split()})


def vocabulary() -> list[str]:
    """Every word the grammar can produce (sorted), e.g. for a word-level tokenizer."""
    return sorted(_VOCABULARY)


# -- the scene catalogue and the train/eval split ------------------------------------------------
def _canonical(spec: SceneSpec) -> str:
    """A key shared by all phrasings of one scene ("A right of B" ≡ "B left of A")."""
    objs = list(spec.objects)
    rel = spec.relation
    if rel in ("right of", "below"):
        objs, rel = objs[::-1], {"right of": "left of", "below": "above"}[rel]
    elif rel is None and len(objs) == 2:
        objs = sorted(objs, key=_object_phrase)
    return f"{spec.level}|{rel}|" + "|".join(_object_phrase(o) for o in objs)


def _all_scenes(level: int) -> list[SceneSpec]:
    singles = [ObjectSpec(k, c) for c in COLOURS for k in KINDS]
    if level == 1:
        return [SceneSpec((o,)) for o in singles]
    if level == 2:
        return [SceneSpec((ObjectSpec(o.kind, o.colour, n),)) for n in (2, 3) for o in singles]
    pairs = [(a, b) for a in singles for b in singles if a.colour != b.colour]
    relations = [None] if level == 3 else list(RELATIONS)
    return [SceneSpec((a, b), rel) for rel in relations for a, b in pairs]


@functools.cache
def _catalogue(level: int) -> dict[str, tuple[SceneSpec, ...]]:
    """All scenes of a level, split into ``train`` and ``eval``."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; levels: {LEVELS}")
    scenes = _all_scenes(level)
    keys = sorted({_canonical(s) for s in scenes}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    held_out = set(keys[: max(1, round(EVAL_FRACTION * len(keys)))])
    return {"train": tuple(s for s in scenes if _canonical(s) not in held_out),
            "eval": tuple(s for s in scenes if _canonical(s) in held_out)}


def scenes(level: int, split: str) -> tuple[SceneSpec, ...]:
    """Every scene (each phrasing) of ``level`` in ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    return _catalogue(level)[split]


def split_of(spec: SceneSpec) -> str:
    """``"train"`` or ``"eval"``: the side of the split ``spec`` falls on."""
    return "eval" if spec in _catalogue(spec.level)["eval"] else "train"


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_specs(rng: np.random.Generator | int, count: int, levels: Sequence[int] = LEVELS,
                 split: str = "train") -> list[SceneSpec]:
    """``count`` scenes: a level uniformly from ``levels``, then a scene of it uniformly from ``split``."""
    rng, levels = _as_rng(rng), tuple(levels)
    pools = [scenes(level, split) for level in levels]
    which = rng.integers(len(levels), size=count)
    picks = rng.random(count)
    return [pools[w][int(p * len(pools[w]))] for w, p in zip(which, picks)]


def sample_prompts(split: str, count: int, seed: int, levels: Sequence[int] = LEVELS) -> list[str]:
    """``count`` prompts of ``split`` drawn under ``seed`` (the two splits never share a prompt)."""
    return [prompt_of(s) for s in sample_specs(seed, count, levels=levels, split=split)]
