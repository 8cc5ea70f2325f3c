from pathlib import Path

import pytest

# The session fixture that starts the local SLURM cluster (slurm/local-cluster.sh) on first use.
pytest_plugins = ["slurm_cluster"]

TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The committed tiny Llama + tokenizer (regenerate with examples/make_tiny.py)."""
    return TINY_MODEL_DIR


@pytest.fixture
def tiny_tokenizer():
    """A fresh copy per test, so tests may add tokens or change the chat template."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


@pytest.fixture(autouse=True)
def _hub_access_restored():
    """`distsft plan` turns hub access off for its own process (runtime.offline); tests that call the
    CLI in-process must not leave it off for the next test (the hub push test talks to a local stand-in)."""
    import os
    import sys
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # the module read the variable when it was imported: tell it too
        hub.HF_HUB_OFFLINE = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
