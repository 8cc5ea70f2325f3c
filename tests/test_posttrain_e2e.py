"""After training, end to end with real processes: `distsft eval` (real lm-evaluation-harness on CPU, a
local task), `distsft export` (write, reload, compare with the run, --check, tampering caught), the
push through huggingface_hub to a local stand-in for the hub (tests/hub_standin.py), and the bad inputs
that must exit 2.

Two runs are trained once per module and shared: full fine-tuning under DDP, and LoRA under FSDP2
(whose checkpoints are DCP shards). The tiny model's tokenizer is given an EOS (`<|eos|>`) that is not
the template's end-of-turn token (`<|im_end|>`), as with many base models, so the exported
generation_config must add the end-of-turn token for generation to stop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import DISTSFT, EVAL, ROOT, TINY, TRAIN, env, metrics

pytestmark = pytest.mark.slow

TASKS = ROOT / "examples" / "eval_tasks"
TOKEN = "hf_standin_token_3141592653"


def distsft(*args: str, extra_env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = env()
    e.pop("HF_TOKEN", None)
    e.update(extra_env or {})
    return subprocess.run([*DISTSFT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
    return p


def base_model(tmp: Path) -> Path:
    """The tiny Llama with EOS `<|eos|>`: the template's end-of-turn `<|im_end|>` is another token."""
    d = tmp / "tiny-eos"
    shutil.copytree(TINY, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|eos|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    from transformers import AutoTokenizer
    eos = AutoTokenizer.from_pretrained(d).convert_tokens_to_ids("<|eos|>")
    for name in ("config.json", "generation_config.json"):
        c = json.loads((d / name).read_text())
        c["eos_token_id"] = eos
        (d / name).write_text(json.dumps(c, indent=2))
    return d


def train(tmp: Path, name: str, extra: str) -> Path:
    out = tmp / name
    spec = tmp / f"{name}.yaml"
    spec.write_text(f"""
model:
  name_or_path: {base_model(tmp) if not (tmp / 'tiny-eos').exists() else tmp / 'tiny-eos'}
data:
  train_files: {TRAIN}
  eval_files: {EVAL}
  max_length: 256
train:
  per_device_train_batch_size: 2
  global_batch_size: 8
  learning_rate: 3.0e-3
  max_steps: 12
  eval_steps: 6
  bf16: false
logging:
  logging_steps: 1
  report_to: [jsonl, tensorboard]
  generation_prompts: ["What is 2 + 3?"]
checkpoint:
  save_steps: 6
output_dir: {out}
{extra}
""")
    ok(distsft("run", spec, "--gpus", "2"))
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # eval.after_training: `distsft run` evaluates the final model once training succeeded.
    return train(tmp_path_factory.mktemp("posttrain"), "full", "distributed:\n  backend: ddp\n"
                 f"eval:\n  tasks: [tiny_arith]\n  include_path: {TASKS}\n  after_training: true\n")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("posttrain-lora"), "lora",
                 "distributed:\n  backend: fsdp\npeft:\n  method: lora\n  r: 8\n  lora_alpha: 16\n")


def tb_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: dict[str, list] = {}
    for events in sorted((run / "tensorboard").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


# ----------------------------------------------------------------------------------------- eval

def test_eval_after_training_then_eval_command_agree_with_lm_eval(full_run: Path) -> None:
    results_file = full_run / "eval" / "final" / "results.json"
    after = json.loads(results_file.read_text())  # written by eval.after_training at the end of the run
    p = ok(distsft("eval", full_run, "--tasks", "tiny_arith", f"eval.include_path={TASKS}"))
    results = json.loads(results_file.read_text())
    acc = results["results"]["tiny_arith"]["acc,none"]
    assert after["results"]["tiny_arith"]["acc,none"] == acc
    assert 0.0 <= acc <= 1.0 and results["n-samples"]["tiny_arith"]["effective"] == 24
    assert results["distsft"]["step"] == 12 and results["distsft"]["apply_chat_template"] is True
    assert "tiny_arith" in p.stdout
    lines = [m for m in metrics(full_run) if "eval/tiny_arith/acc" in m]
    assert [(m["step"], m["eval/tiny_arith/acc"]) for m in lines] == [(12, pytest.approx(acc))] * 2
    assert tb_scalars(full_run)["eval/tiny_arith/acc"] == [(12, pytest.approx(acc))] * 2
    # lm-eval's own command line on the same model, template and task gives the same score.
    e = env()
    direct = subprocess.run(
        [os.path.join(os.path.dirname(os.sys.executable), "lm_eval"), "--model", "hf", "--model_args",
         f"pretrained={full_run},dtype=auto", "--tasks", "tiny_arith", "--include_path", str(TASKS),
         "--apply_chat_template", "--fewshot_as_multiturn", "--device", "cpu", "--batch_size", "8",
         "--output_path", str(full_run.parent / "direct")], capture_output=True, text=True, env=e, timeout=600)
    assert direct.returncode == 0, direct.stderr[-3000:]
    direct_json = next((full_run.parent / "direct").rglob("results_*.json"))
    assert json.loads(direct_json.read_text())["results"]["tiny_arith"]["acc,none"] == pytest.approx(acc)


def test_eval_checkpoint_step_logs_at_that_step(full_run: Path) -> None:
    ok(distsft("eval", full_run, "--checkpoint", "6", "--tasks", "tiny_arith", f"eval.include_path={TASKS}"))
    results = json.loads((full_run / "eval" / "6" / "results.json").read_text())
    acc = results["results"]["tiny_arith"]["acc,none"]
    assert [m["eval/tiny_arith/acc"] for m in metrics(full_run) if m.get("step") == 6 and "eval/tiny_arith/acc" in m] \
        == [pytest.approx(acc)]


def test_eval_sharded_fsdp_lora_checkpoint(lora_run: Path) -> None:
    """A DCP checkpoint (FSDP2 LoRA) is written out as safetensors first, then evaluated."""
    p = ok(distsft("eval", lora_run, "--checkpoint", "6", "--tasks", "tiny_arith", f"eval.include_path={TASKS}"))
    assert "sharded (dcp)" in p.stdout
    assert (lora_run / "eval" / "6" / "results.json").is_file()


def test_eval_bad_input_exits_2(full_run: Path) -> None:
    p = distsft("eval", full_run, "--tasks", "no_such_task_xyz", f"eval.include_path={TASKS}")
    assert p.returncode == 2 and "no_such_task_xyz" in p.stderr and "Traceback" not in p.stderr
    p = distsft("eval", full_run, "--checkpoint", "5", "--tasks", "tiny_arith", f"eval.include_path={TASKS}")
    assert p.returncode == 2 and "checkpoint-5 does not exist" in p.stderr
    partial = full_run / "checkpoint-7"
    shutil.copytree(full_run / "checkpoint-6", partial)
    (partial / "distsft_complete.json").unlink()
    try:
        p = distsft("eval", full_run, "--checkpoint", "7", "--tasks", "tiny_arith", f"eval.include_path={TASKS}")
        assert p.returncode == 2 and "incomplete" in p.stderr
        p = distsft("export", full_run, "--out", full_run.parent / "never", "--checkpoint", "7")
        assert p.returncode == 2 and "incomplete" in p.stderr and not (full_run.parent / "never").exists()
    finally:
        shutil.rmtree(partial)


# ----------------------------------------------------------------------------------------- export

def test_export_full_verified_and_check_catches_tampering(full_run: Path) -> None:
    out = full_run.parent / "export-full"
    p = ok(distsft("export", full_run, "--out", out, "--max-shard-size", "200KB"))
    assert "max |diff| 0 " in p.stdout and "exact" in p.stdout, p.stdout
    assert "ok generation stops at end-of-turn" in p.stdout, p.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and all((out / f).stat().st_size <= 200_000 + 70_000 for f in files)  # + one tensor
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    gen = json.loads((out / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {tok.convert_tokens_to_ids("<|eos|>"), tok.convert_tokens_to_ids("<|im_end|>")}
    assert (out / "chat_template.jinja").read_text() == (TINY / "chat_template.jinja").read_text()
    card = (out / "README.md").read_text()
    losses = [m["loss"] for m in metrics(full_run) if "loss" in m]
    for needle in ("tiny-eos", str(TRAIN), "learning rate | 0.003", f"final train loss | {losses[-1]:.4f}",
                   "final eval loss", "![loss_curves](loss_curves.png)"):
        assert needle in card, needle
    assert (out / "loss_curves.png").is_file()

    assert ok(distsft("export", full_run, "--out", out, "--check")).returncode == 0
    # One weight nudged: the logits no longer match exactly.
    from safetensors.torch import load_file, save_file
    f = out / files[0]
    tensors = load_file(f)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, f, metadata={"format": "pt"})
    p = distsft("export", full_run, "--out", out, "--check")
    assert p.returncode == 1 and "MISMATCH logits" in p.stdout and "max |diff|" in p.stdout, p.stdout


def test_generation_config_without_end_of_turn_fails_check(full_run: Path) -> None:
    out = full_run.parent / "export-eos"
    ok(distsft("export", full_run, "--out", out))
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = gen["eos_token_id"][0]  # the base's EOS only, as exports without the fix ship
    gen_path.write_text(json.dumps(gen))
    p = distsft("export", full_run, "--out", out, "--check")
    assert p.returncode == 1 and "did not stop at the end-of-turn token" in p.stdout, p.stdout


def test_export_bfloat16_within_tolerance(full_run: Path) -> None:
    out = full_run.parent / "export-bf16"
    p = ok(distsft("export", full_run, "--out", out, "--dtype", "bfloat16"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"BF16"}
    assert "allowed" in p.stdout and "MISMATCH" not in p.stdout


def test_export_refuses_non_empty_out_and_missing_token(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    p = distsft("export", full_run, "--out", out)
    assert p.returncode == 2 and "not empty" in p.stderr and (out / "keep.txt").is_file()
    p = distsft("export", full_run, "--out", tmp_path / "new", "--push-to-hub", "me/tiny")
    assert p.returncode == 2 and "HF_TOKEN" in p.stderr and not (tmp_path / "new").exists()
    p = distsft("export", full_run, "--out", tmp_path / "new", "--dtype", "int3")
    assert p.returncode == 2 and "--dtype" in p.stderr


def test_push_to_local_hub_standin(full_run: Path, tmp_path: Path) -> None:
    """Against tests/hub_standin.py, a local stand-in for the hub's HTTP endpoints (no hub here)."""
    from hub_standin import HubStandIn
    out = tmp_path / "push"
    with HubStandIn(TOKEN) as hub:
        p = ok(distsft("export", full_run, "--out", out, "--push-to-hub", "me/tiny-sft", "--private",
                       extra_env={"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}))
        repo = hub.repos["me/tiny-sft"]
    assert repo["private"] is True and len(repo["commits"]) == 1
    local = {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    local.pop("distsft_export.json")  # local bookkeeping (paths of this machine), not uploaded
    assert repo["files"] == local
    # The token travels only in the Authorization header: not in a file, the output, or a URL.
    assert all(TOKEN.encode() not in b for b in local.values())
    assert TOKEN not in p.stdout + p.stderr
    assert all(TOKEN not in r["path"] for r in hub.requests)


# ----------------------------------------------------------------------------------------- LoRA on FSDP2

def test_export_lora_merged_from_fsdp_dcp_checkpoint(lora_run: Path) -> None:
    out = lora_run.parent / "export-merged"
    p = ok(distsft("export", lora_run, "--out", out, "--checkpoint", "6", "--merge"))
    assert "MISMATCH" not in p.stdout and "logits on 3 training examples" in p.stdout
    info = json.loads((out / "distsft_export.json").read_text())
    assert info["layout"] == "dcp" and info["kind"] == "merged"
    # The merge changed the adapted weights (an adapter that did nothing would verify trivially).
    from safetensors.torch import load_file
    merged, base = load_file(out / "model.safetensors"), load_file(lora_run.parent / "tiny-eos" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert float((merged[q] - base[q]).abs().max()) > 1e-4
    assert bool((merged["model.norm.weight"] == base["model.norm.weight"]).all())


def test_export_lora_kept_as_adapter(lora_run: Path) -> None:
    out = lora_run.parent / "export-adapter"
    ok(distsft("export", lora_run, "--out", out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == lora_run.parent / "tiny-eos"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()


def test_adapter_whose_base_is_gone_exits_2(lora_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "lora-moved"
    shutil.copytree(lora_run, moved, ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))
    gone = "/nonexistent/base-model"
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path=gone)))
    run_yaml = (moved / "run.yaml").read_text().replace(str(lora_run.parent / "tiny-eos"), gone)
    (moved / "run.yaml").write_text(run_yaml)
    p = distsft("export", moved, "--out", tmp_path / "x", "--merge")
    assert p.returncode == 2 and "base model" in p.stderr and gone in p.stderr, p.stderr


def test_dcp_checkpoint_export_equals_the_final_adapter(lora_run: Path) -> None:
    """The last FSDP2 checkpoint (DCP shards) and the final adapter hold the same weights: merged, the two
    exports are bitwise equal."""
    from safetensors.torch import load_file
    a, b = lora_run.parent / "merged-12", lora_run.parent / "merged-final"
    ok(distsft("export", lora_run, "--out", a, "--checkpoint", "12", "--merge"))
    ok(distsft("export", lora_run, "--out", b, "--merge"))
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch_equal(ta[k], tb[k]) for k in ta)


def torch_equal(x, y) -> bool:
    import torch
    return bool(torch.equal(x, y))


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("posttrain-z3"), "zero3",
                 "distributed:\n  backend: deepspeed\n  zero_stage: 3\n")


def test_export_zero3_partitions_equal_the_consolidated_final_model(zero3_run: Path) -> None:
    """An intermediate ZeRO-3 checkpoint holds only DeepSpeed's partitions; its export (rebuilt by
    DeepSpeed's zero_to_fp32, a tensor at a time) equals the final model HF consolidated at the end."""
    from safetensors.torch import load_file
    assert not (zero3_run / "checkpoint-12" / "model.safetensors").exists()
    out = zero3_run.parent / "export-z3"
    p = ok(distsft("export", zero3_run, "--out", out, "--checkpoint", "12"))
    assert "max |diff| 0 " in p.stdout and json.loads((out / "distsft_export.json").read_text())["layout"] == "zero"
    got, final = load_file(out / "model.safetensors"), load_file(zero3_run / "model.safetensors")
    assert got.keys() == final.keys() and all(torch_equal(got[k], final[k]) for k in got)


def test_export_best_checkpoint(full_run: Path) -> None:
    state = json.loads((full_run / "checkpoint-12" / "trainer_state.json").read_text())
    out = full_run.parent / "export-best"
    ok(distsft("export", full_run, "--out", out, "--checkpoint", "best"))
    info = json.loads((out / "distsft_export.json").read_text())
    assert Path(info["checkpoint_path"]).name == Path(state["best_model_checkpoint"]).name
    assert info["step"] == state["best_global_step"]
