"""The dev environment stays current: hpsv2's runtime pins (pytest==7.2.0, clint, protobuf<4)
must never reach it. hpsv2 is installed with --no-deps (`make rewards`), its real needs listed in
the `rewards` extra."""

import importlib.metadata as md
from pathlib import Path

import tomllib
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_pytest_and_xdist_are_current():
    assert Version(md.version("pytest")) >= Version("8.3"), "pytest was downgraded (hpsv2 pins pytest==7.2.0)"
    assert Version(md.version("pytest-xdist")) >= Version("3.6")


def test_clint_is_not_installed():
    try:
        md.version("clint")
    except md.PackageNotFoundError:
        return
    raise AssertionError("clint is installed: hpsv2 was installed with its declared runtime pins")


def test_no_extra_lets_pip_resolve_hpsv2_pins():
    for name, reqs in _extras().items():
        for req in reqs:
            assert not req.lower().startswith("hpsv2"), f"extra {name!r} would install hpsv2 with its pins"
            assert not req.lower().startswith(("pytest==7", "clint", "protobuf<4")), req
    assert any(r.startswith("open_clip_torch") for r in _extras()["rewards"])  # hpsv2 needs it
    assert not any(r.lower().startswith(("image-reward", "image_reward")) for r in _extras()["rewards"])


def test_core_install_does_not_need_torchvision():
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(r.startswith(("torchvision", "open_clip", "timm")) for r in core)
