"""Which weights a run's checkpoint holds, read tensor by tensor whatever backend wrote them.

`--checkpoint final|best|N` names one of: the final model in OUTPUT_DIR (written after training, full
or adapter, consolidated by every backend), the best checkpoint (trainer_state.json's
best_model_checkpoint), or `checkpoint-N`. A checkpoint counts only when complete (checkpoint.store's
marker). Three on-disk layouts carry the weights:

* `hf`: safetensors in HF's layout -- the final model, and DDP / ZeRO-1/2 checkpoints (HF's save_model
  writes them): `model.safetensors[.index.json]`, or `adapter_model.safetensors` for LoRA/QLoRA.
* `dcp`: FSDP2's SHARDED_STATE_DICT (`pytorch_model_fsdp_0/`, torch DCP, every rank's shards), keys
  under accelerate's `model.` prefix (train/fsdp.py saves nothing else).
* `zero`: an intermediate ZeRO-3 checkpoint, only DeepSpeed's partitions (`global_stepN/`; see
  checkpoint/saves.py), fp32 masters rebuilt by DeepSpeed's zero_to_fp32 in lazy mode.

Every reader answers `names()` (name -> shape, dtype) without loading, and `read(names)` loads only
those: export streams a model through memory a tensor at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft import rundir
from distsft.checkpoint import store
from distsft.errors import SpecError

FINAL, BEST = "final", "best"
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's FSDP_MODEL_NAME + "_0"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_LORA = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.[^.]+)?\.weight$")


@dataclass
class Checkpoint:
    run_dir: Path
    name: str      # as the user named it: "final", "best" or the step; eval/<name>/ takes it
    path: Path     # the directory holding the weights
    step: int      # the optimizer step whose weights these are (sinks log eval/<task>/<metric> there)
    layout: str    # hf | dcp | zero
    adapter: bool  # LoRA/QLoRA weights only (the base model is elsewhere)


def load_run_spec(run_dir: str | Path, overrides: list[str] | None = None) -> Any:
    """The resolved spec the run trained with (OUTPUT_DIR/run.yaml)."""
    from distsft.config.spec import load_spec
    path = Path(run_dir) / rundir.RUN_YAML
    if not path.is_file():
        raise SpecError(f"RUN_DIR: {run_dir} is not a distsft run directory (no {rundir.RUN_YAML})")
    return load_spec(path, overrides)


def layout_of(path: Path) -> tuple[str, bool] | None:
    """(layout, adapter?) of a directory's weights, None when it holds none."""
    if (path / ADAPTER_WEIGHTS).is_file():
        return "hf", True
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return "hf", False
    if (path / FSDP_MODEL_DIR).is_dir():
        return "dcp", False
    if any(p.is_dir() for p in path.glob("global_step*")):
        return "zero", False
    return None


def _final_step(run_dir: Path) -> int:
    from distsft.observe.metrics import read_metrics
    steps = [int(r["step"]) for r in read_metrics(run_dir) if "step" in r]
    done = [s for s, _ in store.checkpoints(run_dir)]
    return max(steps + done + [0])


def _complete_steps(run_dir: Path) -> str:
    steps = [str(s) for s, p in store.checkpoints(run_dir) if store.is_complete(p)]
    return ", ".join(steps) if steps else "none"


def resolve(run_dir: str | Path, which: str, spec: Any) -> Checkpoint:
    """The checkpoint `--checkpoint` names, or SpecError (exit 2) saying what is missing."""
    run = Path(run_dir)
    which = str(which or FINAL)
    adapter_run = spec.peft.method != "none"
    if which == FINAL:
        found = layout_of(run)
        if found is None or found[0] != "hf":
            raise SpecError(f"--checkpoint final: {run} has no final model (training has not finished); "
                            f"complete checkpoints: {_complete_steps(run)}")
        _check_index(run)
        return Checkpoint(run, FINAL, run, _final_step(run), "hf", found[1])
    if which == BEST:
        path = _best(run)
    elif which.isdigit():
        path = rundir.checkpoint_dir(run, int(which))
        if not path.is_dir():
            raise SpecError(f"--checkpoint {which}: {path} does not exist; complete checkpoints: "
                            f"{_complete_steps(run)}")
    else:
        raise SpecError(f"--checkpoint: {which!r} is not final, best or a step number")
    if not store.is_complete(path):
        raise SpecError(f"--checkpoint {which}: {path} is incomplete (no {rundir.MARKER}: it was interrupted "
                        f"while being written); complete checkpoints: {_complete_steps(run)}")
    found = layout_of(path)
    if found is None:
        raise SpecError(f"--checkpoint {which}: {path} holds no model weights")
    layout, adapter = found
    step = rundir.checkpoint_step(path) or 0
    return Checkpoint(run, which, path, step, layout, adapter or (layout != "hf" and adapter_run))


def _best(run: Path) -> Path:
    latest = store.latest_complete(run)
    state = latest / "trainer_state.json" if latest else None
    best = json.loads(state.read_text()).get("best_model_checkpoint") if state and state.is_file() else None
    if not best:
        raise SpecError("--checkpoint best: the run recorded no best checkpoint (it needs an eval set, "
                        f"train.eval_steps and saved checkpoints); complete checkpoints: {_complete_steps(run)}")
    return run / Path(best).name  # the run directory may have moved since


def _check_index(path: Path) -> None:
    """A final model cut short while being written: an index naming shards that are not there."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted({f for f in json.loads(index.read_text())["weight_map"].values()
                          if not (path / f).is_file()})
        if missing:
            raise SpecError(f"--checkpoint final: {path} is incomplete: {', '.join(missing)} missing")


# ------------------------------------------------------------------------------------- readers

class SafetensorsReader:
    """Tensors of one or more safetensors files, memory-mapped and opened only while read."""

    def __init__(self, files: list[Path], rename: Any = None):
        from safetensors import safe_open
        self._where: dict[str, tuple[Path, str]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], Any]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    name = rename(key) if rename else key
                    if name is None:
                        continue
                    sl = h.get_slice(key)
                    self._where[name] = (f, key)
                    self._meta[name] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))

    def names(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return dict(self._meta)

    def read(self, names: list[str]) -> dict[str, Any]:
        from safetensors import safe_open
        out: dict[str, Any] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._where[n][0], []).append(n)
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as h:  # closed (unmapped) after each group
                for n in group:
                    out[n] = h.get_tensor(self._where[n][1])
        return out


def _st_dtype(name: str) -> Any:
    import torch
    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}[name]


def weight_files(path: Path, stem: str = "model") -> list[Path]:
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = path / f"{stem}.safetensors"
    return [single] if single.is_file() else sorted(path.glob(f"{stem}-*.safetensors"))


class DcpReader:
    """FSDP2's sharded checkpoint (torch DCP). Each read plans a load of only the named keys, so the
    full state dict never exists in this process."""

    def __init__(self, path: Path, rename: Any):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        self._path = path
        meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        self._key: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], Any]] = {}
        for key, m in meta.items():
            name = rename(key)
            if name is not None and isinstance(m, TensorStorageMetadata):
                self._key[name] = key
                self._meta[name] = (tuple(m.size), m.properties.dtype)

    def names(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return dict(self._meta)

    def read(self, names: list[str]) -> dict[str, Any]:
        import torch
        import torch.distributed.checkpoint as dcp
        buf = {self._key[n]: torch.empty(self._meta[n][0], dtype=self._meta[n][1]) for n in names}
        dcp.load(buf, storage_reader=dcp.FileSystemReader(str(self._path)), no_dist=True)
        return {n: buf[self._key[n]] for n in names}


class ZeroReader:
    """An intermediate ZeRO-3 checkpoint: DeepSpeed's own zero_to_fp32 in lazy mode (each tensor is
    gathered from the ranks' flat fp32 partitions only when read)."""

    def __init__(self, path: Path, rename: Any):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(path), lazy_mode=True)
        self._lazy: dict[str, Any] = {}
        for key, t in lazy.items():
            name = rename(key)
            if name is not None:
                self._lazy[name] = t

    def names(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        import torch
        return {n: (tuple(t.shape), getattr(t, "dtype", torch.float32)) for n, t in self._lazy.items()}

    def read(self, names: list[str]) -> dict[str, Any]:
        return {n: self._lazy[n].contiguous() for n in names}


def peft_name(key: str) -> str | None:
    """A LoRA tensor's name as PEFT saves it (`base_model.model.<module>.lora_A.weight`), from any
    layout (DCP's `model.` prefix, a live model's `.default` adapter name); None for other tensors."""
    m = _LORA.search(key)
    if not m:
        return None
    key = key[:m.start()] + f".lora_{m.group(1)}.weight"
    return key[len("model."):] if key.startswith("model.base_model.") else key


def full_name(key: str) -> str | None:
    """A full model's tensor under its HF name (DCP keeps accelerate's `model.` prefix on the model's own
    `model.layers...` names)."""
    return key[len("model."):] if key.startswith("model.") else key


def model_reader(ckpt: Checkpoint) -> Any:
    """The full model's tensors (not for adapter checkpoints: see adapter_reader)."""
    if ckpt.layout == "hf":
        return SafetensorsReader(weight_files(ckpt.path))
    if ckpt.layout == "dcp":
        return DcpReader(ckpt.path / FSDP_MODEL_DIR, full_name)
    return ZeroReader(ckpt.path, lambda k: k)


def adapter_reader(ckpt: Checkpoint) -> Any:
    """The adapter's tensors under PEFT's saved names."""
    if ckpt.layout == "hf":
        return SafetensorsReader([ckpt.path / ADAPTER_WEIGHTS], rename=lambda k: k)
    if ckpt.layout == "dcp":
        return DcpReader(ckpt.path / FSDP_MODEL_DIR, peft_name)
    return ZeroReader(ckpt.path, peft_name)


def adapter_config(ckpt: Checkpoint, spec: Any) -> dict[str, Any]:
    """adapter_config.json for the checkpoint: its own; else the run's (same LoRA settings); else any
    checkpoint's of this run (sharded checkpoints do not carry one)."""
    for d in [ckpt.path, ckpt.run_dir] + [p for _, p in reversed(store.checkpoints(ckpt.run_dir))]:
        f = d / ADAPTER_CONFIG
        if f.is_file():
            return json.loads(f.read_text())
    raise SpecError(f"{ckpt.path}: no {ADAPTER_CONFIG} in the checkpoint or the run directory: the "
                    "adapter's settings are unknown")


def base_model_dir(name_or_path: str) -> Path:
    """The base model's directory: a local path, or a hub id already in the local HF cache. Nothing is
    downloaded here: a base that is not found is bad input (exit 2)."""
    p = Path(name_or_path)
    if p.is_dir():
        if not weight_files(p):
            raise SpecError(f"the adapter's base model {name_or_path} has no safetensors weights")
        return p
    try:
        from huggingface_hub import snapshot_download
        found = Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a valid id, not cached: the same message
        found = None
    if found is None or not weight_files(found):
        raise SpecError(f"the adapter's base model {name_or_path!r} is not found (not a directory, not in "
                        "the local Hugging Face cache)")
    return found
