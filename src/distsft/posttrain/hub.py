"""`--push-to-hub REPO`: the verified export uploaded through huggingface_hub.

`HfApi(token=...).create_repo(exist_ok=True)` then `upload_folder`, which in huggingface_hub 2.x is the
resumable large-folder upload when hf_xet is installed (chunked, deduplicated, committed in batches;
rerunning the same push resumes it) and a single LFS commit otherwise. The token comes from the
environment (HF_TOKEN, read by the caller) and is only handed to HfApi in memory: it is never written
to a file, printed, or put in the model card. The hub's address is huggingface_hub's own setting
(HF_ENDPOINT), which is how the tests point it at their local stand-in (tests/hub_standin.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from distsft.errors import SpecError

# Never uploaded: distsft's own bookkeeping and temporary files.
IGNORE = ["*.tmp", ".cache/**", "distsft_export.json"]  # the last holds local paths


def check_token(token: str | None) -> str:
    if not token:
        raise SpecError("--push-to-hub: HF_TOKEN is not set (export HF_TOKEN=hf_... with write access)")
    return token


def check_repo(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise SpecError(f"--push-to-hub: {repo_id!r} is not a repository id (user/name): {exc}") from None
    if "/" not in repo_id:
        raise SpecError(f"--push-to-hub: {repo_id!r} is not a repository id (user/name)")
    return repo_id


def push(folder: Path, repo_id: str, token: str, private: bool = False,
         say: Callable[[str], None] = print) -> Any:
    """Create the repository if needed and upload the folder; returns the commit info."""
    from huggingface_hub import HfApi
    api = HfApi(token=check_token(token))
    url = api.create_repo(repo_id=check_repo(repo_id), repo_type="model", private=private, exist_ok=True)
    say(f"push: {folder} -> {url}")
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                             commit_message="Upload model exported by distsft", ignore_patterns=IGNORE)
    say(f"push: committed {getattr(info, 'oid', '')} {getattr(info, 'commit_url', '')}".rstrip())
    return info
