"""The environment variables distsft reads besides the rank variables (those are dist.env's), each with
what it means, so no module reads os.environ for itself."""

from __future__ import annotations

import os

CACHE_DIR = "DISTSFT_CACHE_DIR"  # where the data caches live when data.cache_dir is unset
GATHER_INTERMEDIATE_SAVES = "DISTSFT_GATHER_INTERMEDIATE_SAVES"  # "1": ZeRO-3 gathers every save (old behaviour)


def cache_dir() -> str | None:
    return os.environ.get(CACHE_DIR) or None


def gather_intermediate_saves() -> bool:
    return os.environ.get(GATHER_INTERMEDIATE_SAVES) == "1"


def wandb_mode_set() -> bool:
    """Whether the user chose W&B's mode (WANDB_MODE); distsft defaults to offline otherwise."""
    return bool(os.environ.get("WANDB_MODE"))


def wandb_api_key() -> str | None:
    """Read only to redact it from the config W&B records."""
    return os.environ.get("WANDB_API_KEY")


def hf_token() -> str | None:
    """The Hugging Face token for `distsft export --push-to-hub` (HF_TOKEN). Handed to huggingface_hub in
    memory only: never written to a file or printed."""
    return os.environ.get("HF_TOKEN") or None


def tokenizers_single_threaded() -> None:
    """One process per core already (ranks, build workers): no tokenizers thread pool under us."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
