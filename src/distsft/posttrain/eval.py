"""`distsft eval`: lm-evaluation-harness on a run's checkpoint, results beside the run's own metrics.

Tasks come from `--tasks a,b` or `eval.tasks`: lm-eval's registered tasks, plus the task YAMLs under
`eval.include_path` (private and offline benchmarks). The model is handed to lm-eval's HFLM as a path
(the checkpoint's own safetensors, or the base plus `peft=` the adapter), so under `accelerate launch`
HFLM runs data-parallel on its own; sharded checkpoints (FSDP2 DCP, ZeRO-3) are first written out as
HF safetensors in a temporary directory by the export code. The run's chat template (data.chat_template
included) is the tokenizer's template, applied when `eval.apply_chat_template` says so (default: on for
chat-format runs, off for `data.format: text`).

Results go to OUTPUT_DIR/eval/<checkpoint>/results.json (lm-eval's own results dict) and, as
`eval/<task>/<metric>` at the checkpoint's step, to metrics.jsonl and the run's other sinks
(TensorBoard, W&B), so they sit on the same charts as the training curves.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from distsft import rundir
from distsft.errors import SpecError
from distsft.posttrain import source

BATCH_SIZE = 8  # lm-eval's requests per forward; 1 (its default) leaves a GPU mostly idle


def task_list(tasks: str | list[str] | None, spec: Any) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    names = list(tasks or spec.eval.tasks or [])
    if not names:
        raise SpecError("eval.tasks: no tasks (pass --tasks a,b or set eval.tasks in the spec)")
    return names


def include_paths(spec: Any, run_dir: Path) -> list[str]:
    paths = spec.eval.include_path
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    out = []
    for p in paths:
        q = Path(p) if Path(p).is_dir() else (run_dir / p)  # as given (absolute or from here), else the run's
        if not q.is_dir():
            raise SpecError(f"eval.include_path: {p} is not a directory")
        out.append(str(q.resolve()))
    return out


def task_manager(spec: Any, run_dir: Path, names: list[str]) -> Any:
    """lm-eval's TaskManager over its own tasks and eval.include_path; an unknown name is exit 2 here,
    not an exception deep inside lm-eval."""
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=include_paths(spec, run_dir) or None)
    known = set(tm.all_tasks)
    unknown = [n for n in names if n not in known and not Path(n).is_file() and not tm.match_tasks([n])]
    if unknown:
        raise SpecError(f"eval.tasks: unknown lm-eval task(s) {', '.join(unknown)} (not registered and not "
                        "found under eval.include_path)")
    return tm


def chat_default(spec: Any, tokenizer: Any) -> bool:
    """`eval.apply_chat_template` unset: on for runs that trained on conversations through the template."""
    if spec.eval.apply_chat_template is not None:
        return bool(spec.eval.apply_chat_template)
    return spec.data.format != "text" and bool(getattr(tokenizer, "chat_template", None))


def _tokenizer(ckpt: source.Checkpoint, spec: Any, where: Path) -> Any:
    from transformers import AutoTokenizer
    from distsft.data.chat import chat_template_or_none
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=spec.model.trust_remote_code)
    template = chat_template_or_none(tok, spec.data.chat_template)
    if template:
        tok.chat_template = template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _model_dirs(ckpt: source.Checkpoint, spec: Any, tmp: Path, say: Callable) -> tuple[Path, Path | None, Path]:
    """(pretrained, adapter or None, tokenizer dir) for HFLM; sharded checkpoints are exported first."""
    if ckpt.layout != "hf":
        from distsft.posttrain.export import ExportRequest, export
        say(f"eval: {ckpt.path} is sharded ({ckpt.layout}); writing it as safetensors first")
        info = export(ExportRequest(ckpt.run_dir, tmp / "model", checkpoint=ckpt.name), say=lambda s: None)
        out = tmp / "model"
        return (Path(info["base_model"]), out, out) if info["kind"] == "adapter" else (out, None, out)
    tok_dir = next((d for d in (ckpt.path, ckpt.run_dir) if (d / "tokenizer_config.json").is_file()), ckpt.path)
    if ckpt.adapter:
        from distsft.posttrain.export import base_dir_for
        return base_dir_for(ckpt, spec), ckpt.path, tok_dir
    return ckpt.path, None, tok_dir


def metric_records(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"task": {"acc,none": x, "acc_stderr,none": s}} as {"eval/task/acc": x} (a filter other
    than `none` stays in the name: eval/gsm8k/exact_match_strict-match)."""
    out: dict[str, float] = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            out[f"eval/{task}/{name}"] = float(value)
    return out


def write_sinks(run_dir: Path, spec: Any, step: int, scalars: dict[str, float]) -> None:
    """Append the scores to metrics.jsonl and the run's TensorBoard / W&B (same run id) at `step`."""
    if not scalars:
        return
    record = {"step": int(step), **scalars}
    with open(run_dir / rundir.METRICS, "a") as f:  # appended: earlier lines (and later steps) stay
        f.write(json.dumps(record) + "\n")
    extra = [r for r in spec.logging.report_to if r != "jsonl"]
    if extra:
        from distsft.observe.sinks import make_sinks
        for sink in make_sinks(extra, run_dir, spec):
            try:
                sink.write(record)
            finally:
                sink.close()


def run_eval(run_dir: str | Path, checkpoint: str = source.FINAL, tasks: str | list[str] | None = None,
             overrides: list[str] | None = None, say: Callable[[str], None] = print,
             limit: float | None = None) -> dict[str, Any] | None:
    """Evaluate; returns lm-eval's results on the process that writes them (None on other DP ranks)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    run = Path(run_dir)
    spec = source.load_run_spec(run, overrides)
    names = task_list(tasks, spec)
    ckpt = source.resolve(run, checkpoint, spec)
    tm = task_manager(spec, run, names)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="distsft-eval-") as tmp:
        pretrained, adapter, tok_dir = _model_dirs(ckpt, spec, Path(tmp), say)
        tokenizer = _tokenizer(ckpt, spec, tok_dir)
        chat = chat_default(spec, tokenizer)
        say(f"eval: {', '.join(names)} on {ckpt.name} (step {ckpt.step}){' with the chat template' if chat else ''}")
        lm = HFLM(pretrained=str(pretrained), tokenizer=tokenizer, peft=str(adapter) if adapter else None,
                  device="cuda" if torch.cuda.is_available() else "cpu", dtype="auto",
                  batch_size=BATCH_SIZE, trust_remote_code=spec.model.trust_remote_code)
        results = simple_evaluate(model=lm, tasks=names, task_manager=tm, apply_chat_template=chat,
                                  fewshot_as_multiturn=chat, log_samples=False, limit=limit)
    if results is None:
        return None
    from lm_eval.utils import handle_non_serializable, make_table
    results["distsft"] = {"checkpoint": ckpt.name, "step": ckpt.step, "path": str(ckpt.path),
                          "seconds": round(time.time() - started, 2), "apply_chat_template": chat}
    path = rundir.eval_results(run, ckpt.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=handle_non_serializable) + "\n")
    write_sinks(run, spec, ckpt.step, metric_records(results))
    say(make_table(results))
    say(f"eval: results in {path}")
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m distsft.posttrain.eval RUN_DIR [CHECKPOINT]`: the entry `eval.after_training` starts
    (under `accelerate launch` for data-parallel lm-eval on the job's GPUs)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m distsft.posttrain.eval RUN_DIR [final|best|N]", file=sys.stderr)
        return 2
    try:
        run_eval(argv[0], argv[1] if len(argv) > 1 else source.FINAL)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
