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
def _environment_restored():
    """Every test leaves os.environ as it found it. Code under test sets variables for its own process on
    purpose (`distsft plan` turns hub access off, a rank's device setup sets ACCELERATE_USE_CPU), and a
    leaked one changes what later tests' subprocesses do (ACCELERATE_USE_CPU=true turned every later
    DeepSpeed launch into plain DDP). Session fixtures (the SLURM cluster's SLURM_CONF) are set up before
    this snapshot, so they stay."""
    import os
    import sys
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # the module read the variable when it was imported: tell it too
        hub.HF_HUB_OFFLINE = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
