"""`distsft init --model NAME_OR_DIR`: a commented run spec that validates and plans as written.

The model's size and shape come from its config.json: a local directory, a config bundled with distsft
(plan.models: no download), or the hub when it can be reached. The hyperparameters come from the one
table (plan.recommend) by parameter count and method; the backend, activation checkpointing, offload and
micro-batch from the memory estimate for the GPUs given (plan.fit); each data file's format is sniffed
(data.sniff). Every chosen value is written with a one-line comment saying why, and the spec is
validated (config.spec) and its batch arithmetic checked (plan.batch) before the file is written.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distsft.errors import SpecError
from distsft.plan import fit, models, recommend

HEADER = "# written by distsft init"
DEFAULT_GPU_GB = 80.0  # the common training GPU (A100/H100 80 GB) when none is given or seen
MAX_LENGTH = 4096
# A public chat dataset in `messages` format, as a placeholder when no --data is given: `plan` says
# "not read" for it offline (exit 0), and it trains as is with network.
PLACEHOLDER_DATA = {"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "format": "messages"}
HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class ModelInfo:
    name_or_path: str   # what the spec says
    config: dict[str, Any]
    where: str          # "local directory", "bundled config (Qwen2.5)", "hub"


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_config(name: str) -> dict[str, Any] | None:
    """config.json from the local HF cache, else from the hub when it answers; None when offline."""
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if not _hub_reachable():
        return None
    from huggingface_hub import hf_hub_download
    try:
        return json.loads(Path(hf_hub_download(name, "config.json")).read_text())
    except Exception as exc:  # noqa: BLE001 - gated, missing, a typo: all the user's to fix
        raise SpecError(f"--model {name}: cannot read its config.json from the hub "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def resolve_model(name: str) -> ModelInfo:
    """The model's config.json, from the first place that has it; SpecError (exit 2) when none does."""
    p = Path(name).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise SpecError(f"--model {name}: the directory has no config.json (a model directory as saved by "
                            "save_pretrained is needed)")
        try:
            return ModelInfo(str(p), json.loads(cfg.read_text()), "local directory")
        except json.JSONDecodeError as exc:
            raise SpecError(f"{cfg}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    bundled = models.lookup(name)
    if bundled is not None:
        return ModelInfo(bundled.hub_id, bundled.config, f"bundled config ({bundled.family}, "
                                                          f"{bundled.published_parameters} published)")
    if "/" not in name.strip("/") or name.startswith((".", "/", "~")):
        known = ", ".join(sorted(models.families()))
        raise SpecError(f"--model {name}: unknown model family and not a directory; bundled families: {known} "
                        "(e.g. --model Qwen/Qwen2.5-7B-Instruct), or give a hub id or a local model directory")
    config = _hub_config(name)
    if config is None:
        raise SpecError(f"--model {name}: not bundled with distsft and the Hugging Face Hub cannot be reached "
                        "from here; pass a local directory that holds its config.json (--model /path/to/model)")
    return ModelInfo(name, config, "hub")


def shape_of(info: ModelInfo) -> Any:
    from distsft.plan.memory import model_shape
    shape = model_shape(info.name_or_path, config=info.config)
    if shape is None:
        raise SpecError(f"--model {info.name_or_path}: transformers cannot build this architecture "
                        f"(model_type {info.config.get('model_type')!r}) from its config.json")
    return shape


def _gpu_memory(given: float | None) -> tuple[float, str, bool]:
    """(GB per GPU, why, write distributed.gpu_memory_gb)."""
    if given:
        return given, "given (--gpu-memory-gb)", True
    from distsft.runtime.hardware import gpu_memory_gb
    seen = gpu_memory_gb()
    if seen:
        return round(seen, 1), "this machine's GPU", True
    return DEFAULT_GPU_GB, f"assumed {DEFAULT_GPU_GB:g} GB GPUs (none here; pass --gpu-memory-gb)", False


def _data_entries(files: list[str], out_dir: Path) -> list[tuple[dict[str, Any], str]]:
    from distsft.data.sniff import sniff
    entries = []
    for f in files:
        found = sniff(f, f"--data {f}")
        p = Path(f).expanduser()
        # Written so that it resolves the same from the spec's directory and from the working directory.
        path = str(p) if not p.is_absolute() and out_dir.resolve() == Path.cwd().resolve() else str(p.resolve())
        entry: dict[str, Any] = {"path": path, "format": found.format}
        if found.columns:
            entry["columns"] = found.columns
        entries.append((entry, f"{found.why}; {found.examples:,} examples"))
    return entries


def build(model: str, method: str = "full", nodes: int = 1, gpus: int = 1, gpu_memory_gb: float | None = None,
          data: list[str] | None = None, out: str | Path = "run.yaml") -> tuple[str, dict[str, Any], list[str]]:
    """(YAML text, the spec as a dict, summary lines). Raises SpecError for anything the user can fix."""
    from distsft.config.spec import validate
    from distsft.plan.batch import batch_for
    if method not in ("full", "lora", "qlora"):
        raise SpecError(f"--method {method}: expected full, lora or qlora")
    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        raise SpecError(f"--gpu-memory-gb {gpu_memory_gb:g}: must be a positive number of GB")
    info = resolve_model(model)
    shape = shape_of(info)
    n = shape.num_parameters
    peft_method = "none" if method == "full" else method
    gpu_gb, gpu_why, write_gpu = _gpu_memory(gpu_memory_gb)
    max_pos = int(_text_config(info.config).get("max_position_embeddings") or MAX_LENGTH)
    max_length = min(MAX_LENGTH, max_pos)
    out_dir = Path(out).expanduser().parent
    sources = _data_entries(data, out_dir) if data else [(dict(PLACEHOLDER_DATA), "placeholder")]
    short = info.name_or_path.rstrip("/").split("/")[-1].lower()
    raw: dict[str, Any] = {
        "model": {"name_or_path": info.name_or_path},
        "data": {"sources": [e for e, _ in sources], "max_length": max_length, "packing": True},
        "peft": {"method": peft_method},
        "train": {"per_device_train_batch_size": 1},
        "distributed": {"nodes": nodes, "gpus_per_node": gpus},
        "output_dir": f"outputs/{short}-{method}",
    }
    spec = validate(raw, source="init")
    chosen = fit.choose_backend(spec, shape, gpu_gb)
    dp = fit.dp_world(spec)
    rec = recommend.pick(n, peft_method, dp_world=dp, micro=1)
    candidates = fit.micro_candidates(rec.effective_batch, dp)
    best = fit.largest_micro(spec, shape, chosen.label, chosen.gradient_checkpointing, chosen.budget_gb, candidates)
    micro, gb = best if best else (1, chosen.estimate_gb)
    settings = {k: v for k, v in chosen.settings.items() if v not in (None, False) or k == "backend"}
    raw["distributed"].update(settings)
    if write_gpu:
        raw["distributed"]["gpu_memory_gb"] = gpu_gb
    raw["train"] = {"per_device_train_batch_size": micro, "global_batch_size": rec.effective_batch,
                    "learning_rate": rec.learning_rate, "num_train_epochs": rec.epochs,
                    "warmup_ratio": rec.warmup_ratio, "weight_decay": rec.weight_decay,
                    "max_grad_norm": rec.max_grad_norm, "lr_scheduler_type": rec.lr_scheduler_type,
                    "gradient_checkpointing": chosen.gradient_checkpointing}
    if rec.lora_r:
        raw["peft"].update({"r": rec.lora_r, "lora_alpha": rec.lora_alpha})
    final = validate(raw, source="init")
    batch = batch_for(final)
    fitted = fit.Fit(chosen.label, chosen.gradient_checkpointing, micro, gb, chosen.budget_gb, gpu_gb)
    why = _reasons(info, shape, peft_method, rec, fitted, gpu_why, sources, max_pos, max_length, batch, data)
    text = render(raw, why, info, method, nodes, gpus, gpu_gb)
    summary = [f"{info.name_or_path}: {recommend.size(n)} parameters ({info.where})",
               f"{settings['backend']}" + (f" ZeRO-{settings['zero_stage']}" if settings.get("zero_stage") else "")
               + (" + offload optimizer" if settings.get("offload_optimizer") else "")
               + (" + offload params" if settings.get("offload_params") else "")
               + (" + checkpointing" if chosen.gradient_checkpointing else "")
               + f", micro-batch {micro} x accumulation {batch.gradient_accumulation_steps} x {batch.world_size} "
               f"GPUs = global batch {batch.global_batch_size}; {fitted.why()}"]
    return text, raw, summary


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def _reasons(info: ModelInfo, shape: Any, peft_method: str, rec: recommend.Pick, chosen: fit.Fit, gpu_why: str,
             sources: list[tuple[dict[str, Any], str]], max_pos: int, max_length: int, batch: Any,
             data: list[str] | None) -> dict[str, str]:
    backend = {"ddp": "DDP: model states and activations fit unsharded, the fastest choice",
               "zero2": "ZeRO-2: DDP does not fit; sharding gradients and optimizer states does",
               "zero3": "ZeRO-3: weights must be sharded too",
               "zero3+offload_opt": "ZeRO-3 with the optimizer states in CPU memory: nothing on the GPUs alone fits",
               "zero3+offload_all": "ZeRO-3 with weights and optimizer states in CPU memory: nothing less fits",
               "fsdp": "FSDP2: the frozen base weights must be sharded",
               "fsdp+offload": "FSDP2 with CPU offload: nothing on the GPUs alone fits"}[chosen.label]
    n = shape.num_parameters
    return {
        "model.name_or_path": f"{info.where}: {recommend.size(n)} parameters, {shape.num_layers} layers, hidden {shape.hidden_size}",
        "data.sources": ("placeholder: a public chat dataset (messages format); replace with your files "
                         "(distsft init --data FILE)") if not data else "the files given (--data)",
        **{f"data.sources[{i}].format": w if data else "the placeholder's format"
           for i, (_, w) in enumerate(sources)},
        **{f"data.sources[{i}].columns": "the file's own name for the column the format reads"
           for i in range(len(sources))},
        "data.max_length": f"min({MAX_LENGTH}, the model's {max_pos:,}-token context); longer examples are truncated",
        "data.packing": "packs examples into full rows: no padding, exact per-example attention",
        "peft.method": {"none": "full fine-tuning (--method full)", "lora": "LoRA adapters (--method lora)",
                        "qlora": "LoRA on a 4-bit base model (--method qlora)"}[peft_method],
        "peft.r": rec.why.get("r", ""),
        "peft.lora_alpha": "2 x r: the usual scale of the adapter's update",
        "train.per_device_train_batch_size": f"the largest that fits and divides the global batch: {chosen.why()}",
        "train.global_batch_size": rec.why["global_batch_size"] + f"; accumulation {batch.gradient_accumulation_steps}"
                                   " is derived from it",
        "train.learning_rate": rec.why["learning_rate"],
        "train.num_train_epochs": rec.why["num_train_epochs"],
        "train.warmup_ratio": rec.why["warmup_ratio"],
        "train.weight_decay": rec.why["weight_decay"],
        "train.max_grad_norm": rec.why["max_grad_norm"],
        "train.lr_scheduler_type": rec.why["lr_scheduler_type"],
        "train.gradient_checkpointing": ("on: without it the activations do not fit" if chosen.gradient_checkpointing
                                         else "off: activations fit, and recomputing them would cost ~30% time"),
        "distributed.backend": backend,
        "distributed.zero_stage": "the ZeRO stage of the backend chosen above",
        "distributed.offload_optimizer": "Adam's states in CPU memory (DeepSpeed's CPU Adam steps them)",
        "distributed.offload_params": "weights in CPU memory, fetched a layer at a time",
        "distributed.gpu_memory_gb": f"{gpu_why}: what the micro-batch was fitted to",
        "distributed.nodes": "--nodes", "distributed.gpus_per_node": "--gpus",
        "output_dir": "checkpoints, metrics and the final model go here",
    }


def _scalar(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def render(raw: dict[str, Any], why: dict[str, str], info: ModelInfo, method: str, nodes: int, gpus: int,
           gpu_gb: float) -> str:
    """The spec as YAML, one key per line, each chosen value followed by its reason."""
    lines = [f"{HEADER}: {info.name_or_path}, {method} fine-tuning on {nodes} node(s) x {gpus} GPU(s) of "
             f"{gpu_gb:g} GB.",
             "# Each value says why it was chosen; `distsft plan` on this file shows the batch arithmetic, memory",
             "# per GPU and the estimated time. Edit freely: plan warns when a value leaves the recommended range."]

    def line(indent: str, key: str, value: Any, dotted: str) -> str:
        comment = why.get(dotted, "")
        return f"{indent}{key}: {_scalar(value)}" + (f"  # {comment}" if comment else "")

    for section, body in raw.items():
        if not isinstance(body, dict):
            lines.append(line("", section, body, section))
            continue
        lines.append(f"{section}:")
        for key, value in body.items():
            dotted = f"{section}.{key}"
            if key == "sources":
                lines.append(f"  sources:  # {why[dotted]}")
                for i, src in enumerate(value):
                    for j, (k, v) in enumerate(src.items()):
                        lines.append(line("    - " if j == 0 else "      ", k, v, f"data.sources[{i}].{k}"))
            else:
                lines.append(line("  ", key, value, dotted))
    return "\n".join(lines) + "\n"


def write(text: str, out: str | Path) -> Path:
    """Writes the spec; a file that init did not write is never overwritten."""
    p = Path(out).expanduser()
    if p.exists() and not p.read_text(errors="replace").startswith(HEADER):
        raise SpecError(f"--out {out}: the file exists and was not written by distsft init; choose another "
                        "path or remove it")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def run(model: str, method: str, nodes: int, gpus: int, gpu_memory_gb: float | None, data: list[str] | None,
        out: str) -> int:
    text, _, summary = build(model, method, nodes, gpus, gpu_memory_gb, data, out)
    path = write(text, out)
    print(f"wrote {path}")
    for s in summary:
        print(f"  {s}")
    print(f"next: distsft plan {path}")
    return 0
