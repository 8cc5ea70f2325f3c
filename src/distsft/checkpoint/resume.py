"""What a run resumes from, and whether it may: rank 0's one decision for all ranks, and the guards that
refuse a checkpoint this run would continue wrongly (another global batch, seed, optimizer, data,
sequence layout or backend). Used by the ranks (train.recipe) and, before any rank starts, by the launcher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distsft.checkpoint import store as checkpoint, universal
from distsft.checkpoint.store import Marker
from distsft.runtime import dist
from distsft.config.spec import RunSpec
from distsft.errors import SpecError


def decide(spec: RunSpec, out: Path, batch: Any, world_size: int) -> tuple[Path | None, bool, Any]:
    """Rank 0 resolves the checkpoint to resume from, checks it fits this run, and decides whether it
    loads through the universal checkpoint (a ZeRO checkpoint from another process count); every rank
    gets that one decision (checkpoint path, load_universal, its marker)."""
    def decide() -> tuple[str | None, bool, Marker | None]:
        found = checkpoint.resolve_resume(spec.checkpoint.resume, out)
        if found is None:
            return None, False, None
        marker = checkpoint.read_marker(found)
        check_resume_compatible(marker, spec, batch)
        return str(found), universal.needs_universal(found, world_size), marker
    path, load_universal, marker = dist.agree(decide)
    return (Path(path) if path else None), load_universal, marker


def train_data_key(spec: RunSpec, tokenizer: Any) -> str:
    """The training data's fingerprint (its cache key: files, tokenizer, template, data settings)."""
    from distsft.data.cache import cache_key
    return cache_key(spec, tokenizer, "train")


def check_data_unchanged(marker: Marker, data_key: str) -> None:
    """Refuse a resume onto other training data: the saved position would index another sample order."""
    if marker.data_key not in (None, data_key):
        raise SpecError(
            f"the checkpoint was trained on other data (fingerprint {marker.data_key}, now {data_key}): the "
            "data files, tokenizer, chat template or data settings changed since it was saved, so resuming "
            "would continue a different sample order. Put the data back, or start afresh with "
            "checkpoint.resume=never (or another output_dir)")


def check_resume_compatible(marker: Marker, spec: RunSpec, batch: Any) -> None:
    """Refuse a resume that would silently change the global batch, the data order, the sequence layout
    or the optimizer state's format. The world size may change (the accumulation is re-derived and a
    ZeRO checkpoint is converted), so it is not compared."""
    if marker.global_batch_size != batch.global_batch_size:
        raise SpecError(
            f"the checkpoint was trained with global batch {marker.global_batch_size} but this run "
            f"plans {batch.global_batch_size}; set train.global_batch_size={marker.global_batch_size} "
            "(accumulation is re-derived for the new GPU count) or checkpoint.resume=never")
    if marker.seed != spec.train.seed:
        raise SpecError(f"the checkpoint used train.seed={marker.seed}; resuming with seed "
                        f"{spec.train.seed} would change the data order")
    if marker.optim not in (None, spec.train.optim):
        raise SpecError(f"the checkpoint was trained with train.optim={marker.optim}; its optimizer state "
                        f"cannot be loaded into {spec.train.optim}: set train.optim={marker.optim} "
                        "or checkpoint.resume=never")
    d = spec.distributed
    now = {"data.max_length": ("max_length", spec.data.max_length), "data.packing": ("packing", spec.data.packing),
           "distributed.backend": ("backend", d.backend)}
    if d.backend == "deepspeed" and (marker.backend or "deepspeed") == "deepspeed":
        now["distributed.zero_stage"] = ("zero_stage", d.stage)
    saved = {field: getattr(marker, field) for field, _ in now.values()}
    diff = [(key, saved[field], value) for key, (field, value) in now.items()
            if saved[field] is not None and saved[field] != value]
    if diff:
        what = "; ".join(f"{key} was {old!r}, now {new!r}" for key, old, new in diff)
        why = ("its optimizer state is in another format" if any(k.startswith("distributed.") for k, _, _ in diff)
               else "the packed rows, and so the sample order, would differ")
        back = " ".join(f"{key}={old}" for key, old, _ in diff)
        raise SpecError(f"this run differs from the checkpoint it would resume ({what}): {why}. Put it back "
                        f"({back}), or start afresh with checkpoint.resume=never (or another output_dir)")
    # A DeepSpeed ZeRO checkpoint from another process count is converted (universal.convert_if_needed).
