"""Hub access off for the commands that must answer from this machine alone (`plan`): local files and
the Hugging Face cache only. Without it an uncached hub model or dataset costs ~25 s of retries, each
printed, before failing; with it the failure is immediate and says "offline" (errors.NotReachable)."""

from __future__ import annotations

import os
import sys


def hub_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # read at import time: already imported, so tell the module itself
        hub.HF_HUB_OFFLINE = True
