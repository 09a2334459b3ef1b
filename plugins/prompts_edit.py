"""The editing prompt set: instructions, each with the source image it edits (``EditPrompt`` items).

The two file layouts (a JSONL file, a folder of images with same-named ``.txt`` instructions) are
``mixgrpo.core.edits``'s, validated whole when the prompt set is built, which the trainer does before
any model loads.

Draws are those of the ``file`` prompt set (``FilePrompts``): evaluation takes the first held-out
edits in order, training a stream of one keyed permutation per epoch.
"""

from __future__ import annotations

from mixgrpo.core.edits import IMAGE_SUFFIXES, LINE_FORMAT, check_image, read_edits, read_folder, read_jsonl
from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.plugins.prompts import FilePrompts

__all__ = ["IMAGE_SUFFIXES", "LINE_FORMAT", "EditPrompts", "check_image", "read_edits", "read_folder", "read_jsonl"]


class EditPrompts(FilePrompts):
    """Editing prompts: ``EditPrompt`` items (an instruction and its source image) from a JSONL file or
    a folder (module docstring).

    Args:
        train_path: the training edits.
        eval_path: the held-out edits; if omitted, the last ``eval_fraction`` of the training edits
            are held out (and never drawn for training).
        eval_fraction: see above.
    """

    def __init__(self, train_path: str, eval_path: str | None = None, eval_fraction: float = 0.1) -> None:
        train = read_edits(train_path)
        if not train:
            raise ValueError(f"EditPrompts.train_path = {train_path!r} holds no edits; add some or bind "
                             f"EditPrompts.train_path to another file or folder")
        if eval_path is not None:
            self.train, self.eval = train, read_edits(eval_path)
            if not self.eval:
                raise ValueError(f"EditPrompts.eval_path = {eval_path!r} holds no edits; add held-out edits or "
                                 f"leave it unbound to hold out the last EditPrompts.eval_fraction of the train set")
            return
        cut = max(1, int(len(train) * (1 - eval_fraction)))
        self.train, self.eval = train[:cut], train[cut:]
        if not self.eval:
            raise ValueError(f"EditPrompts.train_path = {train_path!r} holds {len(train)} edit(s), too few to hold "
                             f"out EditPrompts.eval_fraction = {eval_fraction} of them for evaluation: add edits, "
                             f"raise the fraction, or bind EditPrompts.eval_path to held-out edits")


@hookimpl
def register_prompt_sets(register):
    register("edit", EditPrompts)
