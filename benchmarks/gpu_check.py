"""The GPU check: one command, one GPU, under 10 minutes including set-up, models built from configs
(nothing downloaded). It exercises every path that CPU CI runs only through stand-ins:

    make gpu-check              # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --only isolation,sliding --work /tmp/distsft-gpu-check

  isolation   packed examples equal each example alone on the real sdpa and flash-attn kernels, with fp32
              master weights under bf16 autocast (as distsft trains full fine-tuning); and the real
              flash-attn kernel refuses the same fp32 weights without autocast (issue 19 item 1)
  sliding     a Mistral with sliding_window < every example, packed, on sdpa, eager and flash-attn:
              distsft's eval loss equals each example alone, and differs without the window (item 13)
  train-fa2   `distsft run` with flash_attention_2, bf16, eval and sample generations: exit 0, finite
              eval_loss, samples = rows of the global batch, mfu logged (items 1, 14)
  qlora       `distsft run` with peft.method=qlora (bitsandbytes 4-bit)
  kernels     `distsft run` with train.torch_compile, and Liger when liger-kernel imports
  fsdp2       `distsft run` with distributed.backend=fsdp at world size 1, with eval and generation (item 7)
  autobatch   `distsft run` with per_device_train_batch_size: auto: the probe's forward/backward on the
              longest row confirms the estimate, auto_batch.json records it, a rerun reads it (issue 23)
  throughput  a ~1.1B Llama, 4096-token packed rows: distsft vs the plain TRL script on the same GPU,
              real tokens/s and MFU side by side

It prints one table (check, result, seconds, detail) and exits 1 if any check failed (2 without CUDA).
A check whose optional package is missing (flash-attn, bitsandbytes, liger-kernel) says SKIP and does
not fail the run. Everything is written under --work (default /tmp/distsft-gpu-check).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

FA2 = "flash_attention_2"
SEQ = 4096


class Skip(Exception):
    """A check that cannot run here (an optional package is missing); not a failure."""


def flash_attn_imports() -> bool:
    try:
        import flash_attn  # noqa: F401 - a real import: a wheel built for another torch fails here
        return True
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- in-process checks

def _rows(lengths: tuple[int, ...], groups: tuple[tuple[int, ...], ...], vocab: int, seed: int = 0) -> list[dict]:
    import numpy as np
    rng = np.random.default_rng(seed)
    ex = []
    for n in lengths:
        ids = rng.integers(5, vocab, size=n)
        labels = ids.copy()
        labels[: n // 3] = -100
        ex.append((ids, labels))
    return [{"input_ids": np.concatenate([ex[i][0] for i in g]).tolist(),
             "labels": np.concatenate([ex[i][1] for i in g]).tolist(),
             "seq_lengths": [len(ex[i][0]) for i in g]} for g in groups]


def _model(cfg: Any, attn: str) -> Any:
    """fp32 weights (distsft's masters for full fine-tuning) on the GPU, with TRL's fused LM head (what
    SFTTrainer adds, and what distsft's eval runs through)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer import add_fused_lm_head
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).cuda().eval()
    add_fused_lm_head(model)
    return model


def _packed_vs_alone(model: Any, attn: str, rows: list[dict]) -> tuple[float, float, float]:
    """(max |logit difference| packed vs alone relative to the largest |logit|, distsft's packed eval loss,
    the examples' own loss), under bf16 autocast (bf16 rounds a logit by ~0.4 % of its size)."""
    import torch
    from distsft.data.collate import PackedCollator
    from distsft.train.eval_loss import token_loss_sum
    batch = PackedCollator(0, attn)(rows)
    labels = batch.pop("labels")
    cuda = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    worst, leak, largest, total, count = 0.0, 0.0, 0.0, 0.0, 0
    # The same rows without isolation (positions running across examples, no boundaries): what a leak
    # between examples would look like, the yardstick for the packed-vs-alone difference.
    leaky = {"input_ids": cuda["input_ids"], "use_cache": False,
             "position_ids": torch.arange(cuda["input_ids"].shape[1], device="cuda").expand_as(cuda["input_ids"])}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed_logits = model(**cuda).logits.float()
        leaky_logits = model(**leaky).logits.float()
        s, n = token_loss_sum(model, cuda, labels)
        packed_loss = float(s) / n
        flat = 0
        for b, row in enumerate(rows):
            start = 0
            for length in row["seq_lengths"]:
                ids = torch.tensor(row["input_ids"][start:start + length], device="cuda")[None]
                lab = torch.tensor(row["labels"][start:start + length], device="cuda")[None]
                alone = model(input_ids=ids, use_cache=False).logits.float()[0]
                where = (0, slice(flat, flat + length)) if attn == FA2 else (b, slice(start, start + length))
                worst = max(worst, float((packed_logits[where] - alone).abs().max()))
                leak = max(leak, float((leaky_logits[where] - alone).abs().max()))
                largest = max(largest, float(alone.abs().max()))
                out = model(input_ids=ids, labels=lab, fused_lm_head=True, use_cache=False)
                total += -float(out.log_probs.float().sum())
                count += int((lab[0, 1:] != -100).sum())
                start += length
                flat += length
    return worst / max(largest, 1e-6), leak / max(largest, 1e-6), packed_loss, total / count


def check_isolation(a: argparse.Namespace) -> str:
    import torch
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, initializer_range=0.2, pad_token_id=0)
    rows = _rows((37, 120, 64, 250, 9, 180), ((0, 1, 2), (3, 4, 5)), cfg.vocab_size)
    details = []
    for attn in ("sdpa", FA2):
        if attn == FA2 and not flash_attn_imports():
            details.append("flash-attn: SKIP (does not import)")
            continue
        model = _model(cfg, attn)
        worst, leak, packed, alone = _packed_vs_alone(model, attn, rows)
        if worst > leak / 5 or abs(packed - alone) > 1e-2:
            raise AssertionError(f"{attn}: packed differs from alone: logits {worst:.3g} (relative; a leak "
                                 f"between examples: {leak:.3g}), loss {packed:.5f} vs {alone:.5f}")
        details.append(f"{attn}: max|dlogit|/max|logit| {worst:.1e} (leak {leak:.1e}), loss {packed:.4f}={alone:.4f}")
        if attn == FA2:
            try:
                with torch.no_grad():
                    model(input_ids=torch.ones(1, 8, dtype=torch.long, device="cuda"))
                raise AssertionError("flash-attn accepted fp32 q/k/v: the stand-in's contract is wrong")
            except RuntimeError as exc:
                if "fp16 and bf16" not in str(exc):
                    raise
                details.append("fp32 without autocast refused by the kernel")
    return "; ".join(details)


def check_sliding(a: argparse.Namespace) -> str:
    from transformers import MistralConfig
    details = []
    for attn in ("sdpa", "eager", FA2):
        if attn == FA2 and not flash_attn_imports():
            details.append("flash-attn: SKIP")
            continue
        losses = {}
        for window in (16, None):
            cfg = MistralConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=2, sliding_window=window,
                                initializer_range=0.2, pad_token_id=0)
            rows = _rows((37, 120, 64, 250, 29, 180), ((0, 1, 2), (3, 4, 5)), cfg.vocab_size)
            losses[window] = _packed_vs_alone(_model(cfg, attn), attn, rows)
        _, _, packed, alone = losses[16]
        if abs(packed - alone) > 1e-2:
            raise AssertionError(f"{attn}: packed eval loss {packed:.5f} != each example alone {alone:.5f}")
        if abs(losses[None][3] - alone) < 5e-2:
            raise AssertionError(f"{attn}: the window does not change the loss; the check proves nothing")
        details.append(f"{attn}: {packed:.4f}={alone:.4f} (no window {losses[None][3]:.4f})")
    return "; ".join(details)


# --------------------------------------------------------------------------- `distsft run` checks

def _distsft_run(a: argparse.Namespace, name: str, extra: dict[str, dict[str, Any]], steps: int = 8,
                 eval_steps: int | None = 4, timeout: float = 420) -> list[dict]:
    import common as C
    out = C.fresh(a.work / name)
    spec_extra: dict[str, dict[str, Any]] = {"model": {"attn_implementation": "auto"},
                                             "train": {"bf16": True}, "data": {}, "logging": {}}
    if eval_steps:
        spec_extra["data"]["eval_files"] = [str(C.ROOT / "examples" / "data" / "eval.jsonl")]
        spec_extra["train"]["eval_steps"] = eval_steps
    for section, values in extra.items():
        spec_extra.setdefault(section, {}).update(values)
    spec = C.write_spec(a.work / f"{name}.yaml", data=a.data, output_dir=out, max_steps=steps, logging_steps=1,
                        per_device=4, global_batch=8, extra=spec_extra)
    env = C.bench_env(DISTSFT_CACHE_DIR=str(a.work / "distsft-cache"))
    run = C.run_logged([str(C.BIN / "distsft"), "run", str(spec), "--gpus", "1"], env=env,
                       rank_pattern="distsft", timeout=timeout)
    if run.rc != 0:
        raise AssertionError(f"exit {run.rc}; log ends:\n{run.text()[-2500:]}")
    metrics = C.read_jsonl(out / "metrics.jsonl")
    train = [m for m in metrics if "loss" in m]
    if len(train) != steps or not all(math.isfinite(m["loss"]) for m in train):
        raise AssertionError(f"expected {steps} finite losses, got {[m.get('loss') for m in train]}")
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    if eval_steps and not (evals and all(math.isfinite(e) for e in evals)):
        raise AssertionError(f"no finite eval_loss logged: {evals}")
    return metrics


def check_train_fa2(a: argparse.Namespace) -> str:
    if not flash_attn_imports():
        raise Skip("flash-attn does not import")
    metrics = _distsft_run(a, "train-fa2", {"model": {"attn_implementation": FA2},
                                             "logging": {"generation_steps": 4,
                                                         "generation_prompts": ["Uppercase: kalo"]}})
    train = [m for m in metrics if "loss" in m]
    if any(m["samples"] != 8 for m in train):
        raise AssertionError(f"samples should be the 8 rows of each step: {[m['samples'] for m in train]}")
    if not all(0 < m.get("mfu", 0) < 1 for m in train[1:]):
        raise AssertionError(f"mfu missing or out of range: {[m.get('mfu') for m in train]}")
    return f"eval_loss {[round(m['eval_loss'], 4) for m in metrics if 'eval_loss' in m]}, mfu logged"


def check_qlora(a: argparse.Namespace) -> str:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes not installed")
    metrics = _distsft_run(a, "qlora", {"peft": {"method": "qlora", "r": 8, "lora_alpha": 16}})
    return f"loss {metrics[0]['loss']:.3f} -> {[m for m in metrics if 'loss' in m][-1]['loss']:.3f}"


def check_kernels(a: argparse.Namespace) -> str:
    done = []
    _distsft_run(a, "compile", {"train": {"torch_compile": True}}, eval_steps=None)
    done.append("torch.compile")
    if importlib.util.find_spec("liger_kernel") is not None:
        _distsft_run(a, "liger", {"model": {"use_liger_kernel": True}}, eval_steps=None)
        done.append("Liger")
    else:
        done.append("Liger SKIP (not installed)")
    return ", ".join(done)


def check_fsdp2(a: argparse.Namespace) -> str:
    metrics = _distsft_run(a, "fsdp2", {"distributed": {"backend": "fsdp"},
                                        "logging": {"generation_steps": 4, "generation_prompts": ["Reverse: kalo"]}})
    gens = [m for m in metrics if "generations" in m]
    if not gens:
        raise AssertionError("no sample generations logged under FSDP2")
    return f"eval_loss {[round(m['eval_loss'], 4) for m in metrics if 'eval_loss' in m]}, {len(gens)} generation records"


def check_autobatch(a: argparse.Namespace) -> str:
    import json
    metrics = _distsft_run(a, "autobatch", {"train": {"per_device_train_batch_size": "auto"}}, steps=4, eval_steps=None)
    rec = json.loads((a.work / "autobatch" / "auto_batch.json").read_text())
    micro = rec["per_device_train_batch_size"]
    if not (1 <= micro <= 8 and 8 % micro == 0 and rec["global_batch_size"] == 8):
        raise AssertionError(f"auto_batch.json does not keep the global batch of 8: {rec}")
    if any(m["samples"] != 8 for m in metrics if "loss" in m):
        raise AssertionError("the global batch changed under auto")
    return f"probe settled on {micro} (estimate {rec['estimated']}), 8 rows per step kept"


def check_throughput(a: argparse.Namespace) -> str:
    import torch
    import common as C
    from gpu_throughput import build_model

    from distsft.observe.mfu import peak_tflops
    attn = FA2 if flash_attn_imports() else "sdpa"
    model_dir = a.work / "llama-1b"
    params = build_model(model_dir)
    data = C.make_data(a.work, 12_000)
    env = C.bench_env(DISTSFT_CACHE_DIR=str(a.work / "distsft-cache"), HF_DATASETS_CACHE=str(a.work / "hf-cache"))
    out = C.fresh(a.work / "tp-distsft")
    spec = C.write_spec(a.work / "tp-distsft.yaml", data=data, output_dir=out, max_steps=a.steps, logging_steps=1,
                        max_length=SEQ, per_device=1, global_batch=a.accum,
                        extra={"model": {"name_or_path": str(model_dir), "attn_implementation": attn},
                               "train": {"bf16": True}})
    run = C.run_logged([str(C.BIN / "distsft"), "run", str(spec), "--gpus", "1"], env=env,
                       rank_pattern="distsft", timeout=600)
    C.check(run, "distsft 1B")
    metrics = C.read_jsonl(out / "metrics.jsonl")
    mine = C.distsft_steady(metrics, skip=2)["tokens_per_s"]
    logged = [m["mfu"] for m in metrics if "mfu" in m and m["step"] > 2]
    out = C.fresh(a.work / "tp-trl")
    cmd = C.plain_trl_cmd(data=data, output_dir=out, max_steps=a.steps, result=out / "result.json", max_length=SEQ,
                          per_device=1, accum=a.accum, gradient_checkpointing="off", num_processes=1,
                          extra=["--bf16", "--attn", attn])
    cmd[cmd.index("--model") + 1] = str(model_dir)
    run = C.run_logged(cmd, env=env, rank_pattern="plain_trl.py", timeout=600)
    C.check(run, "plain TRL 1B")
    res = C.plain_result(run)
    trl = C.steady(res["step_tokens"][2:], res["step_times"][1:])["tokens_per_s"]
    peak = peak_tflops(torch.cuda.get_device_name(0), a.peak_tflops)
    mfu = (lambda tps: f"{100 * 6 * params * tps / (peak * 1e12):.1f}%") if peak else (lambda tps: "?")
    live = f", logged {100 * sum(logged) / len(logged):.1f}%" if logged else ", no mfu logged"
    return (f"{params / 1e9:.2f}B, {attn}, {SEQ} tokens/row: distsft {mine:,.0f} tok/s (MFU {mfu(mine)}{live}) | "
            f"plain TRL {trl:,.0f} tok/s (MFU {mfu(trl)}) | distsft/TRL {mine / trl:.3f}")


CHECKS: dict[str, tuple[str, Callable[[argparse.Namespace], str]]] = {
    "isolation": ("packed isolation, real kernels, fp32 masters + autocast", check_isolation),
    "sliding": ("sliding-window Mistral packed (sdpa, eager, FA2)", check_sliding),
    "train-fa2": ("distsft run: FA2 + eval + generation", check_train_fa2),
    "qlora": ("distsft run: QLoRA", check_qlora),
    "kernels": ("distsft run: torch.compile, Liger", check_kernels),
    "fsdp2": ("distsft run: FSDP2, world size 1", check_fsdp2),
    "autobatch": ("distsft run: per_device_train_batch_size auto, GPU probe", check_autobatch),
    "throughput": ("~1B Llama, 4k packed: distsft vs plain TRL", check_throughput),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--work", type=Path, default=Path("/tmp/distsft-gpu-check"))
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps of the throughput runs")
    ap.add_argument("--accum", type=int, default=4, help="4096-token micro-batches per optimizer step (throughput)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in mfu.py")
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU and this machine has none; nothing was run.", file=sys.stderr)
        return 2
    import common as C
    a.work.mkdir(parents=True, exist_ok=True)
    a.data = C.make_data(a.work, 2_000)
    started = time.time()
    results = []
    for key in [k.strip() for k in a.only.split(",") if k.strip()]:
        if key not in CHECKS:
            print(f"unknown check {key!r}; choose from {', '.join(CHECKS)}", file=sys.stderr)
            return 2
        title, fn = CHECKS[key]
        t0 = time.time()
        try:
            status, detail = "PASS", fn(a)
        except Skip as exc:
            status, detail = "SKIP", str(exc)
        except Exception as exc:  # noqa: BLE001 - every failure is one row of the table
            status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        results.append((key, title, status, time.time() - t0, detail))
        print(f"[{time.time() - started:6.0f}s] {key}: {status}", flush=True)
    print(f"\n{torch.cuda.get_device_name(0)}; {C.versions()}; flash-attn {'imports' if flash_attn_imports() else 'absent'}; "
          f"total {time.time() - started:.0f} s\n")
    print("| check | what | result | seconds | detail |")
    print("|---|---|---|---|---|")
    for key, title, status, secs, detail in results:
        print(f"| {key} | {title} | {status} | {secs:.0f} | {detail.splitlines()[0][:300] if detail else ''} |")
    return 1 if any(r[2] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
