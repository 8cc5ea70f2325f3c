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
