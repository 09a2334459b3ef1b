import os

# A stray hub call must fail at once, not after retries: nothing here may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import gin  # noqa: E402
import pytest  # noqa: E402

# the commands layer's gin configurable (CompareConfig), as the command line registers it when it
# starts: the tests parse compare files with the engine's parse_gin directly
import mixgrpo.commands.compare  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """Bindings one test parses (e.g. `FluxBackbone.height = 720` from a paper config) must not
    configure the components a later test creates through the plugin manager in the same worker."""
    yield
    gin.clear_config()
