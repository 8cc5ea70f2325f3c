"""`distsft export`: a run's checkpoint as a model others can load and serve.

From any complete checkpoint of any backend (source.py reads DDP/ZeRO-1/2 safetensors, FSDP2's DCP
shards and ZeRO-3 partitions alike), it writes HF safetensors sharded by size (shards.py, a tensor at a
time), the LoRA adapter merged (merge.py; QLoRA onto its NF4 round trip) or kept, the tokenizer with
the chat template the run trained with, a generation_config that stops at the template's end-of-turn
token (turns.py), a model card (card.py), and `distsft_export.json` (what was exported, from where),
which `--check` reads back. Then it verifies the export (verify.py) and, if asked, pushes it (hub.py).

Exit codes: 0 written and verified; 1 verification failed (the numbers are printed); 2 bad input.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distsft.errors import SpecError
from distsft.posttrain import shards, source

EXPORT_INFO = "distsft_export.json"
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SHARD = "2GB"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


@dataclass
class ExportRequest:
    run_dir: Path
    out: Path
    checkpoint: str = source.FINAL
    merge: bool = False
    dtype: str | None = None
    overwrite: bool = False
    max_shard_size: str = DEFAULT_SHARD
    overrides: list[str] = field(default_factory=list)


def torch_dtype(name: str | None) -> Any:
    import torch
    if name is None:
        return None
    if name not in DTYPES:
        raise SpecError(f"--dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def prepare_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    """An empty output directory: refuses a non-empty one without --overwrite, and never the run's own."""
    out = out.resolve()
    if out == run_dir.resolve() or run_dir.resolve().is_relative_to(out):
        raise SpecError(f"--out: {out} is (or contains) the run directory; export to another directory")
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SpecError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _first_dir(dirs: list[Path], names: tuple[str, ...]) -> Path | None:
    return next((d for d in dirs if any((d / n).is_file() for n in names)), None)


def export(req: ExportRequest, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the export (not yet verified); returns what distsft_export.json records."""
    started = time.time()
    spec = source.load_run_spec(req.run_dir, req.overrides)
    ckpt = source.resolve(req.run_dir, req.checkpoint, spec)
    dtype = torch_dtype(req.dtype)
    max_bytes = shards.parse_size(req.max_shard_size)
    base_dir = None
    if ckpt.adapter:
        cfg = source.adapter_config(ckpt, spec)
        base_dir = _base_dir(cfg, spec)
    prepare_out(req.out, req.run_dir, req.overwrite)
    say(f"export: {ckpt.path} (step {ckpt.step}, {ckpt.layout}{', adapter' if ckpt.adapter else ''}) -> {req.out}")
    if ckpt.adapter and not req.merge:
        kind, out_dtype = "adapter", _write_adapter(ckpt, cfg, base_dir, req.out, dtype)
    elif ckpt.adapter:
        kind, out_dtype = "merged", _write_merged(ckpt, spec, cfg, base_dir, req.out, dtype, max_bytes, say)
    else:
        kind, out_dtype = "full", _write_full(ckpt, req.out, dtype, max_bytes, say)
    config_dir = base_dir if kind == "merged" else _first_dir([ckpt.path, ckpt.run_dir, Path(spec.model.name_or_path)],
                                                              ("config.json",))
    model_config = _write_config(config_dir, req.out, out_dtype, write=kind != "adapter")
    tokenizer, template = _write_tokenizer(ckpt, spec, req.out)
    from distsft.posttrain.turns import generation_config
    gen_source = _first_dir([ckpt.path, ckpt.run_dir, config_dir], ("generation_config.json",)) or config_dir
    gen = generation_config(gen_source, model_config, tokenizer, template)
    gen.save_pretrained(req.out)
    info = {"run_dir": str(req.run_dir.resolve()), "checkpoint": ckpt.name, "checkpoint_path": str(ckpt.path.resolve()),
            "step": ckpt.step, "layout": ckpt.layout, "kind": kind, "dtype": str(out_dtype).removeprefix("torch."),
            "base_model": str(base_dir) if base_dir else spec.model.name_or_path,
            "eos_token_id": gen.eos_token_id, "seconds": round(time.time() - started, 2)}
    from distsft.posttrain.card import write_card
    write_card(req.out, spec, ckpt, info)
    (req.out / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return info


def base_dir_for(ckpt: source.Checkpoint, spec: Any) -> Path:
    """The directory of an adapter checkpoint's base model (SpecError when it is not found)."""
    return _base_dir(source.adapter_config(ckpt, spec), spec)


def _base_dir(cfg: dict[str, Any], spec: Any) -> Path:
    """The adapter's base: what its config names, else the run's model.name_or_path (a moved base)."""
    named = cfg.get("base_model_name_or_path") or spec.model.name_or_path
    try:
        return source.base_model_dir(named)
    except SpecError:
        if named == spec.model.name_or_path:
            raise
        return source.base_model_dir(spec.model.name_or_path)


def _cast(t: Any, dtype: Any) -> Any:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _write_full(ckpt: source.Checkpoint, out: Path, dtype: Any, max_bytes: int, say: Callable) -> Any:
    reader = source.model_reader(ckpt)
    entries = [(n, shape, dtype if dtype is not None and d.is_floating_point else d)
               for n, (shape, d) in reader.names().items()]
    shards.write_model(out, entries, lambda n: _cast(reader.read([n])[n], dtype), max_bytes, progress=say)
    return _main_dtype(entries)


def _write_merged(ckpt: source.Checkpoint, spec: Any, cfg: dict[str, Any], base_dir: Path, out: Path,
                  dtype: Any, max_bytes: int, say: Callable) -> Any:
    import torch
    from distsft.posttrain import merge
    adapter_reader = source.adapter_reader(ckpt)
    adapter = adapter_reader.read(list(adapter_reader.names()))
    base = source.SafetensorsReader(source.weight_files(base_dir))
    qlora = spec.peft.method == "qlora"
    if dtype is None:  # QLoRA's base is bf16 (its compute dtype); a LoRA base keeps its own dtype
        dtype = torch.bfloat16 if qlora else _main_dtype([(n, s, d) for n, (s, d) in base.names().items()])
    why = merge.needs_peft_merge(list(adapter), cfg)
    if why is not None and not qlora:
        say(f"  {why}: merging with PEFT in memory (not streamed)")
        with tempfile.TemporaryDirectory() as tmp:
            _save_adapter(adapter, cfg, base_dir, Path(tmp), None)
            state = merge.peft_merged_state(base_dir, tmp, dtype)
        entries = [(n, tuple(t.shape), t.dtype) for n, t in state.items()]
        shards.write_model(out, entries, state.pop, max_bytes, progress=say)
        return dtype
    if why is not None:
        raise SpecError(f"export --merge: a QLoRA adapter with {why} cannot be merged here; export it "
                        "without --merge (the adapter is kept)")
    quantized = merge.quantized_linears(base_dir) if qlora else None
    merged = merge.MergedWeights(base, adapter, cfg, dtype, quantized)
    shards.write_model(out, merged.entries(), merged, max_bytes, progress=say)
    return dtype


def _save_adapter(adapter: dict[str, Any], cfg: dict[str, Any], base_dir: Path, out: Path, dtype: Any) -> None:
    from safetensors.torch import save_file
    save_file({k: _cast(v, dtype).contiguous() for k, v in adapter.items()}, str(out / source.ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    cfg = dict(cfg, base_model_name_or_path=str(base_dir), inference_mode=True)
    (out / source.ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


def _write_adapter(ckpt: source.Checkpoint, cfg: dict[str, Any], base_dir: Path, out: Path, dtype: Any) -> Any:
    """The adapter kept as an adapter (small: read whole), under PEFT's names, pointing at its base."""
    reader = source.adapter_reader(ckpt)
    adapter = reader.read(list(reader.names()))
    _save_adapter(adapter, cfg, base_dir, out, dtype)
    return _main_dtype([(n, tuple(t.shape), _cast(t, dtype).dtype) for n, t in adapter.items()])


def _main_dtype(entries: list[tuple[str, Any, Any]]) -> Any:
    import torch
    floats = [e[2] for e in entries if e[2].is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _write_config(config_dir: Path | None, out: Path, dtype: Any, write: bool) -> Any:
    from transformers import AutoConfig
    if config_dir is None:
        raise SpecError("export: no config.json in the checkpoint, the run directory or the base model")
    config = AutoConfig.from_pretrained(config_dir)
    if write:
        config.dtype = dtype
        if hasattr(config, "quantization_config"):  # a merged QLoRA export is a plain model
            del config.quantization_config
        config.save_pretrained(out)
    return config


def _write_tokenizer(ckpt: source.Checkpoint, spec: Any, out: Path) -> tuple[Any, str]:
    """The tokenizer the run saved (added tokens included) with the template it trained with."""
    from transformers import AutoTokenizer
    from distsft.data.chat import resolve_chat_template
    where = _first_dir([ckpt.path, ckpt.run_dir, Path(spec.model.name_or_path)], _TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(where or spec.model.name_or_path,
                                              trust_remote_code=spec.model.trust_remote_code)
    template = resolve_chat_template(tokenizer, spec.data.chat_template)
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    return tokenizer, template


def read_info(out: Path) -> dict[str, Any]:
    path = Path(out) / EXPORT_INFO
    if not path.is_file():
        raise SpecError(f"--check: {out} is not a distsft export (no {EXPORT_INFO})")
    return json.loads(path.read_text())
