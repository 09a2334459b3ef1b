import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    """A module of benchmarks/ (a folder of scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench():
    return _load("iteration_time")


@pytest.fixture(scope="session")
def archs():
    return _load("architectures")


@pytest.fixture(scope="session")
def offpolicy():
    return _load("offpolicy_ratios")
