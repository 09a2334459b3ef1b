"""The file formats of edit prompts (``EditPrompt``: an instruction with the source image it edits),
read by the ``edit`` prompt set for training and by ``mixgrpo sample``, each file validated whole so
that a missing or unreadable image stops the command at once, naming its file and line:

* a JSONL file, one edit per line: ``{"image": "cat.png", "instruction": "make the cat blue"}``;
  a relative image path is relative to the JSONL file's folder; blank lines are skipped.
* a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``), each with its instruction
  in a text file of the same name beside it (``cat.png`` and ``cat.txt``), in file-name order.
"""

from __future__ import annotations

import json
from pathlib import Path

from mixgrpo.core.types import EditPrompt

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LINE_FORMAT = '{"image": "path/to/source.png", "instruction": "what to change"}'


def check_image(image: Path, where: str) -> None:
    """Raise, naming ``where`` (file and line), unless ``image`` is a file PIL can read."""
    from PIL import Image, UnidentifiedImageError

    if not image.is_file():
        raise FileNotFoundError(f"{where}: source image {str(image)!r} not found; fix the path (relative paths are "
                                f"relative to the JSONL file's folder) or remove the edit")
    try:
        with Image.open(image) as opened:
            opened.verify()  # reads the whole file: a truncated or corrupt image fails here, not mid-run
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{where}: source image {str(image)!r} is not a readable image ({type(exc).__name__}: "
                         f"{exc}); replace the file or remove the edit") from None


def _parse_line(line: str, where: str) -> tuple[str, str]:
    """``(image, instruction)`` of one JSONL line, or an error that shows the expected format."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not a JSON object ({exc.msg}); each line must be {LINE_FORMAT}") from None
    image = record.get("image") if isinstance(record, dict) else None
    instruction = record.get("instruction") if isinstance(record, dict) else None
    if not (isinstance(image, str) and image and isinstance(instruction, str) and instruction.strip()):
        raise ValueError(f"{where}: needs \"image\" (a path) and \"instruction\" (non-empty text), got "
                         f"{line.strip()[:120]}; each line must be {LINE_FORMAT}")
    return image, instruction.strip()


def read_jsonl(path: Path) -> list[EditPrompt]:
    """The edits of a JSONL file, every image checked (``check_image``)."""
    edits = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        image, instruction = _parse_line(line, where)
        source = Path(image).expanduser()
        source = source if source.is_absolute() else path.parent / source
        check_image(source, where)
        edits.append(EditPrompt(instruction, source))
    return edits


def read_folder(folder: Path) -> list[EditPrompt]:
    """The edits of a folder of images with same-named ``.txt`` instructions, in file-name order."""
    edits = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        text = image.with_suffix(".txt")
        if not text.is_file():
            raise FileNotFoundError(f"{image}: no instruction beside it; write it to {text.name} (one edit per "
                                    f"image, the instruction in a text file of the same name)")
        instruction = text.read_text().strip()
        if not instruction:
            raise ValueError(f"{text}: the instruction for {image.name} is empty; write what to change")
        check_image(image, str(image))
        edits.append(EditPrompt(instruction, image))
    return edits


def read_edits(path: str) -> list[EditPrompt]:
    """The edits of a JSONL file or a folder (module docstring)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return read_folder(p)
    if p.is_file():
        return read_jsonl(p)
    raise FileNotFoundError(f"edit prompt set {path!r} not found: give a JSONL file of {LINE_FORMAT} lines or a "
                            f"folder of images with same-named .txt instructions")
