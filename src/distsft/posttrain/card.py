"""The export's model card (README.md): what a reader needs to trust or reproduce the model.

Base model, data sources and their shares (from the run's spec and the cached data figures), the key
hyperparameters, the final train/eval losses (metrics.jsonl), lm-eval results when `distsft eval` ran
on this checkpoint, and the run's plots (copied next to the card). The YAML front matter is the hub's
model-card metadata (base_model, library_name, tags).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from distsft import rundir

PLOTS = (rundir.LOSS_CURVES_PNG, rundir.LR_SCHEDULE_PNG, rundir.LENGTH_HISTOGRAM_PNG)


def _sources(spec: Any) -> list[tuple[str, str]]:
    """(source, share) for each training source, as the spec states it."""
    d = spec.data
    rows: list[tuple[str, str]] = []
    for src in getattr(d, "sources", None) or []:
        share = (f"{src.fraction:.0%} of it" if getattr(src, "fraction", None) is not None
                 else f"{src.count} examples" if getattr(src, "count", None) is not None else "all")
        name = src.path + (f" ({src.subset})" if getattr(src, "subset", None) else "")
        rows.append((name, share))
    for f in getattr(d, "train_files", None) or []:
        rows.append((str(f), "all"))
    return rows


def _source_counts(spec: Any) -> dict[str, int]:
    """Examples per source from the data cache's figures, when the cache is still there."""
    try:
        from distsft.data.cache import cached_stats, default_cache_root
        stats = cached_stats(spec, "train", default_cache_root(spec)) or {}
    except Exception:  # noqa: BLE001 - the card is written without counts then
        return {}
    return {s.get("path", ""): int(s.get("examples", 0)) for s in stats.get("sources", []) if isinstance(s, dict)}


def _losses(run_dir: Path) -> tuple[float | None, float | None]:
    from distsft.observe.metrics import read_metrics
    recs = read_metrics(run_dir)
    train = [r["loss"] for r in recs if isinstance(r.get("loss"), (int, float))]
    evals = [r["eval_loss"] for r in recs if isinstance(r.get("eval_loss"), (int, float))]
    return (train[-1] if train else None), (evals[-1] if evals else None)


def _eval_results(run_dir: Path, name: str) -> list[tuple[str, str, float]]:
    path = rundir.eval_results(run_dir, name)
    if not path.is_file():
        return []
    results = json.loads(path.read_text()).get("results", {})
    return [(task, metric.split(",")[0], float(v)) for task, ms in sorted(results.items())
            for metric, v in ms.items() if isinstance(v, (int, float)) and "stderr" not in metric
            and metric != "alias"]


def card_text(spec: Any, ckpt: Any, info: dict[str, Any], sources: list[tuple[str, str]],
              counts: dict[str, int], losses: tuple[float | None, float | None],
              evals: list[tuple[str, str, float]], plots: list[str]) -> str:
    t, p = spec.train, spec.peft
    base = info.get("base_model") or spec.model.name_or_path
    method = {"none": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}[p.method]
    kind = {"full": "full weights", "merged": f"{method} adapter merged into the base",
            "adapter": f"{method} adapter (load it on the base model)"}[info["kind"]]
    # The hub's metadata takes a model id; a local base directory is named in the text only.
    meta_base = [] if Path(str(base)).exists() else [f"base_model: {base}"]
    lines = ["---", *meta_base, "library_name: " + ("peft" if info["kind"] == "adapter" else "transformers"),
             "tags:", "- distsft", "- sft", "---", "",
             f"# {Path(spec.output_dir).name}", "",
             f"Supervised fine-tune of `{base}` with distsft ({method}), exported from "
             f"`{ckpt.name}` (step {ckpt.step}) as {kind}, {info['dtype']}.", "",
             "## Data", "", "| source | share | examples |", "|---|---|---|"]
    for name, share in sources:
        lines.append(f"| `{name}` | {share} | {counts.get(name, '')} |")
    lines += ["", f"Format `{spec.data.format}`, max length {spec.data.max_length} tokens, "
              f"packing {'on' if spec.data.packing else 'off'}.", "",
              "## Training", "", "| hyperparameter | value |", "|---|---|"]
    hp = [("learning rate", t.learning_rate), ("scheduler", t.lr_scheduler_type), ("warmup ratio", t.warmup_ratio),
          ("per-device batch", t.per_device_train_batch_size), ("global batch", t.global_batch_size),
          ("epochs", t.num_train_epochs), ("max steps", t.max_steps), ("optimizer", t.optim),
          ("weight decay", t.weight_decay), ("backend", spec.distributed.backend), ("seed", t.seed)]
    if p.method != "none":
        hp += [("LoRA r", p.r), ("LoRA alpha", p.lora_alpha), ("LoRA dropout", p.lora_dropout),
               ("target modules", p.target_modules)]
    lines += [f"| {k} | {v} |" for k, v in hp if v is not None]
    train_loss, eval_loss = losses
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    if train_loss is not None:
        lines.append(f"| final train loss | {train_loss:.4f} |")
    if eval_loss is not None:
        lines.append(f"| final eval loss | {eval_loss:.4f} |")
    lines += [f"| {task} {metric} | {v:.4f} |" for task, metric, v in evals]
    lines += [""] + [f"![{Path(f).stem}]({f})" for f in plots]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForCausalLM.from_pretrained(PATH)" if info["kind"] != "adapter"
              else "from peft import AutoPeftModelForCausalLM; model = AutoPeftModelForCausalLM.from_pretrained(PATH)\n"
              "from transformers import GenerationConfig; model.generation_config = GenerationConfig.from_pretrained(PATH)",
              "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True, return_tensors='pt')",
              "out = model.generate(ids, max_new_tokens=128)  # generation_config stops at the end-of-turn token",
              "```", ""]
    return "\n".join(lines)


def write_card(out: Path, spec: Any, ckpt: Any, info: dict[str, Any]) -> Path:
    run = Path(ckpt.run_dir)
    plots = []
    for name in PLOTS:
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
            plots.append(name)
    text = card_text(spec, ckpt, info, _sources(spec), _source_counts(spec), _losses(run),
                     _eval_results(run, ckpt.name), plots)
    path = out / "README.md"
    path.write_text(text)
    return path
