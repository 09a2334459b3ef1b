"""A procedural world of coloured shapes with GenEval-like prompts; nothing is downloaded.

Scenes are drawn from a closed vocabulary (kind, colour, count, relative position) at four levels:

1. ``"a red circle"``                          one object
2. ``"two blue squares"``                      counting
3. ``"a red circle and a green square"``       two objects (always of different colours)
4. ``"a red circle left of a blue triangle"``  relative position

Images are 32×32 RGB float in [0, 1] on a black background, anti-aliased by 4× supersampling.
Everything is a pure function of a seed. A fixed 20% of the distinct scenes of each level (chosen by
a hash of the scene, so both phrasings of one scene fall on the same side) is held out as the
``eval`` split and never drawn for ``train``.

Kinds are axis-aligned: circles, squares and isosceles triangles (apex up, base = height), each
with a bounding-box side drawn from ``SIZE_RANGE``.

``detect_objects`` is the inverse measurement used by the rewards: colour segmentation against the
palette, connected components, and a shape test from the soft fill of the bounding box (square 1,
circle π/4) and the centroid's offset from the box centre (triangles only).

This module is the world's public face; the parts live in ``scenes.py`` (vocabulary, specs, prompts,
split), ``rendering.py`` and ``detection.py``.
"""

from mixgrpo.plugins.world.detection import (  # noqa: F401
    Detection,
    classify_pixels,
    connected_components,
    detect_batch,
    detect_objects,
)
from mixgrpo.plugins.world.rendering import render, render_batch  # noqa: F401
from mixgrpo.plugins.world.scenes import (  # noqa: F401
    COLOURS,
    COUNT_WORDS,
    EVAL_FRACTION,
    IMAGE_SIZE,
    KINDS,
    LEVELS,
    RELATIONS,
    SIZE_RANGE,
    SPLITS,
    ObjectSpec,
    SceneSpec,
    parse_prompt,
    prompt_of,
    sample_prompts,
    sample_specs,
    scenes,
    split_of,
    vocabulary,
)
