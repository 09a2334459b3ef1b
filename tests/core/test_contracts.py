"""The framework knows its plugins only through the declared contracts of ``core/interfaces.py``.

Every ``.py`` file under ``core/`` (the engine) and ``commands/`` (the commands and reports) is read,
and the test fails where

(a) ``getattr``/``hasattr`` probes an object for a member, unless the use is listed in ``ALLOWED``
    with the reason it is no plugin dispatch (a member the interfaces do not declare would be read
    that way: declare it instead, with a default, and read it directly), or
(b) a plugin's name or a plugin-specific library appears in the code: a string literal that is a
    built-in backbone's registered name (``'flux'``, ``'sd3'``, ``'toy'``), or an identifier or
    string naming FLUX's or SD3's diffusers classes or peft. Docstrings and comments may mention
    models as examples; ``core/interfaces.py`` may not even mention peft.

``flux_mu`` (``core/sigmas.py``) is allowed by name: it is FLUX's published formula of the
resolution-dependent shift ``mu`` as a function of the image token count, which the σ grid
``grid = 'dynamic'`` uses for any backbone; it names the paper's formula and dispatches on nothing.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from mixgrpo.testing import BackboneContract

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = (ROOT / "core", ROOT / "commands")

#: (file, the call as written) -> why it is not a probe of a plugin object
ALLOWED: dict[tuple[str, str], str] = {
    ("commands/base_eval.py", "getattr(c, name)"): "the TrainConfig fields listed in EVAL_FIELDS (a core record)",
    ("core/checkpoint.py", 'getattr(opt, "optimizer", opt)'):
        "accelerate's AcceleratedOptimizer wraps the torch optimizer; a bare optimizer has no wrapper",
    ("commands/cli.py", 'getattr(args, "output", None)'): "an argparse namespace: not every sub-command has --output",
    ("core/config.py", "getattr(self, field)"): "TrainConfig checking its own fields by name in its validation",
    ("core/gin_files.py", 'getattr(exists, "_mixgrpo_tolerant", False)'):
        "gin internals: marks gin's file-exists checks that were already wrapped",
    ("core/interfaces.py", 'hasattr(module, "module")'):
        "Backbone.unwrapped() peels torch wrappers (DDP) off an nn.Module: no plugin object",
    ("core/validators.py", 'getattr(factory, "__qualname__", repr(factory))'):
        "Python's name of a registered factory (any callable), for an error message",
    ("core/plugins.py", 'getattr(self.factory, "__name__", self.name)'):
        "Python's name of a registered factory (any callable): its gin name",
    ("core/plugins.py", 'getattr(factory, "__module__", None)'):
        "Python's module of a registered factory, the gin module it is registered under",
    ("core/plugins.py", 'getattr(plugin, "__name__", None)'): "the name pluggy registers a plugin module under",
    ("core/plugins.py", 'getattr(ep, "dist", None)'): "importlib's entry point: its distribution, when known",
    ("core/plugins.py", "getattr(self.pm.hook, hook_name)"): "pluggy's hook caller of a hook spec, by name",
    ("core/progress.py", 'getattr(self, "disable", True)'):
        "tqdm subclass: close() may run before tqdm's __init__ set disable",
    ("core/validators.py", "getattr(instance, other)"):
        "an attrs validator comparing a field with another field of the same record (self)",
}

#: (file, line as written, stripped) of offenders that are being removed elsewhere; delete an entry
#: as soon as its line is gone (``test_pending_entries_still_exist`` says which)
PENDING: set[tuple[str, str]] = set()

BACKBONE_NAMES = {"flux", "sd3", "toy", "qwenimage", "flux2", "zimage", "flux_kontext"}
FORBIDDEN = re.compile(r"flux|sd3|stablediffusion|peft", re.IGNORECASE)  # in identifiers
FORBIDDEN_IN_STRINGS = re.compile(
    r"\b(FluxPipeline|StableDiffusion3Pipeline|FluxTransformer2DModel|SD3Transformer2DModel|Flux2KleinPipeline|"
    r"Flux2Transformer2DModel|FluxKontextPipeline|QwenImagePipeline|QwenImageTransformer2DModel|ZImagePipeline|ZImageTransformer2DModel|"
    r"peft\w*)\b")
#: identifiers matching FORBIDDEN that are allowed, with the reason
ALLOWED_IDENTIFIERS = {
    "flux_mu": "FLUX's published shift formula mu(image tokens) for the dynamic σ grid (see the module docstring)",
}


def core_files() -> list[Path]:
    return sorted(path for folder in FOLDERS for path in folder.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def offences(path: Path, file: str | None = None) -> list[tuple[str, str, str]]:
    """``(line as written, stripped; what; why it fails)`` for every offence in ``path`` (``file``:
    its name in ``ALLOWED``, default its path in the repository)."""
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    file = file or rel(path)
    found = []

    def line(node: ast.AST) -> str:
        return lines[node.lineno - 1].strip()

    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            call = ast.get_source_segment(src, node)
            if (file, call) not in ALLOWED:
                found.append((line(node), call, "probes an object for a member: declare it on the interface"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value.strip().lower() in BACKBONE_NAMES:
                found.append((line(node), repr(node.value), "names a plugin"))
            elif FORBIDDEN_IN_STRINGS.search(node.value):
                found.append((line(node), repr(node.value), "names a plugin's diffusers class or peft"))
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME and FORBIDDEN.search(tok.string) and tok.string not in ALLOWED_IDENTIFIERS:
            found.append((lines[tok.start[0] - 1].strip(), tok.string, "a plugin-specific identifier"))
    return found


def test_core_knows_plugins_only_through_declared_contracts():
    failures = [f"{rel(path)}: {what} ({why})\n    {text}"
                for path in core_files() for text, what, why in offences(path)
                if (rel(path), text) not in PENDING]
    assert not failures, "the core reaches past the declared contracts:\n" + "\n".join(failures)


def test_pending_entries_still_exist():
    """A PENDING entry whose line is gone has been fixed: remove it, so it cannot hide a new offence."""
    live = {(rel(path), text) for path in core_files() for text, _, _ in offences(path)}
    stale = sorted(PENDING - live)
    assert not stale, f"fixed, remove from PENDING in {rel(Path(__file__))}: {stale}"


def test_interfaces_do_not_mention_peft():
    assert "peft" not in (ROOT / "core" / "interfaces.py").read_text().lower()


@pytest.mark.parametrize("source, expected", [
    ('x = getattr(backbone, "lora_rank", 0)', "probes"),
    ("ok = hasattr(self.backbone, 'cfg_scale')", "probes"),
    ("if family == 'flux': pass", "names a plugin"),
    ('name = "SD3"', "names a plugin"),
    ('cls = "FluxPipeline"', "diffusers class"),
    ("from diffusers import SD3Transformer2DModel", "identifier"),
    ("import peft", "identifier"),
    ("config = model.peft_config", "identifier"),
    ('def f():\n    """Loads a FluxPipeline, as sd3 does."""\n', None),  # a docstring may name models
    ("mu = flux_mu(4096)", None),
])
def test_the_check_catches_what_it_should(tmp_path, source, expected):
    (tmp_path / "probe.py").write_text(source + "\n")
    found = offences(tmp_path / "probe.py", "core/probe.py")
    if expected is None:
        assert not found, found
    else:
        assert found and expected in " ".join(f"{what} {why}" for _, what, why in found), found


# -- the toy backbone under the backbone contract ------------------------------------------------
class TestToyBackboneContract(BackboneContract):
    def make_backbone(self):
        from mixgrpo.plugins.backbones.toy import ToyBackbone

        return ToyBackbone()
