"""Library-side precision and the launcher's side effects:

* DeepSpeed under bf16 reduces and accumulates gradients in fp32 (what the engine really uses, read
  back from a real DeepSpeed engine on CPU, not only the rendered dict);
* FSDP2's policy reduces in fp32 (accelerate's own default reduces in bf16);
* plan counts FSDP2's unsharded gradients only when sync_each_batch is off;
* the QLoRA probe runs in a child process (the launcher imports neither torch nor bitsandbytes for it)
  and still reports a failure as one message;
* the universal conversion runs DeepSpeed's converter with more than one worker.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import helpers as h
from distsft.config.spec import load_spec
from distsft.plan.batch import batch_for


def _spec(tmp_path, extra):
    return load_spec(h.write_spec(tmp_path / "s.yaml", tmp_path / "out", extra))


DS_SCRIPT = """
import os, sys, torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import deepspeed
from distsft.config.spec import load_spec
from distsft.plan.batch import batch_for
from distsft.train.backend import render_deepspeed
deepspeed.init_distributed(dist_backend="gloo")
for stage in (1, 2, 3):
    spec = load_spec(sys.argv[1], [f"distributed.zero_stage={stage}"])
    cfg = render_deepspeed(spec, batch_for(spec), "bf16")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(torch.bfloat16)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    for _ in range(2):
        loss = engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    print("RESULT", stage, type(opt).__name__, engine.communication_data_type, engine.get_data_types()[1],
          getattr(opt, "gradient_accumulation_dtype", None))
"""


def test_deepspeed_engine_reduces_and_accumulates_in_fp32(tmp_path):
    """Read back from real DeepSpeed engines (ZeRO-1/2/3, bf16, CPU), two steps each: fp32 reduction and
    fp32 accumulation (ZeRO-1 through DeepSpeed's BF16_Optimizer, which accumulates in fp32)."""
    from distsft.train.backend import render_deepspeed
    spec_path = h.write_spec(tmp_path / "s.yaml", tmp_path / "out",
                             "train:\n  bf16: true\ndistributed:\n  backend: deepspeed\n  gpus_per_node: 1\n")
    spec = load_spec(spec_path)
    assert render_deepspeed(spec, batch_for(spec), "fp16").get("communication_data_type") is None
    p = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(spec_path), "29657"], capture_output=True, text=True,
                       env=h.env(), timeout=600)
    rows = [ln.split()[1:] for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    assert len(rows) == 3, p.stderr[-3000:]
    for stage, opt, comm, accum, opt_accum in rows:
        assert comm == "torch.float32" and accum == "torch.float32", rows
        assert opt_accum == "torch.float32" or opt == "BF16_Optimizer", rows


def test_fsdp_policy_reduces_in_fp32_and_plugin_keeps_it():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from distsft.train.fsdp import mixed_precision_policy
    assert mixed_precision_policy("no") is None
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=mixed_precision_policy("bf16"))
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with the top-level mixed_precision
    p = plugin.mixed_precision_policy
    assert (p.param_dtype, p.reduce_dtype, p.output_dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    default = FullyShardedDataParallelPlugin(fsdp_version=2)
    default.set_mixed_precision("bf16")
    assert default.mixed_precision_policy.reduce_dtype == torch.bfloat16  # what accelerate does alone


def test_plan_counts_unsharded_fsdp_gradients_only_without_sync_each_batch(tmp_path):
    from distsft.plan.memory import estimate
    from distsft.plan.report import make_plan
    base = "distributed:\n  backend: fsdp\n  gpus_per_node: 2\n"
    synced = _spec(tmp_path, base)
    unsynced = _spec(tmp_path, base + "  sync_each_batch: false\n")
    from distsft.plan.memory import ModelShape
    shape = ModelShape(num_parameters=1_000_000_000, largest_layer_parameters=50_000_000, hidden_size=2048,
                       num_layers=16, vocab_size=32000, linear_layers=())
    a = estimate(synced, make_plan(synced), shape=shape)
    b = estimate(unsynced, make_plan(unsynced), shape=shape)
    assert make_plan(synced).gradient_accumulation_steps > 1
    extra = (b["model_states_gb"] - a["model_states_gb"]) * 2**30
    assert extra == pytest.approx(a["trainable_parameters"] * 4, rel=0.01)  # fp32 spec: 4 B per value
    assert b["per_stage_gb"]["fsdp"] > a["per_stage_gb"]["fsdp"]
    assert b["per_stage_gb"]["zero3"] == a["per_stage_gb"]["zero3"]


def test_sync_each_batch_reaches_the_trainer_arguments(tmp_path):
    from distsft.train.fsdp import accelerator_config, sync_each_batch
    fsdp = _spec(tmp_path, "distributed:\n  backend: fsdp\n  gpus_per_node: 2\n")
    assert sync_each_batch(fsdp, 2) and not sync_each_batch(fsdp, 1)
    assert accelerator_config(fsdp, 2) == {"gradient_accumulation_kwargs": {"sync_each_batch": True}}
    off = _spec(tmp_path, "distributed:\n  backend: fsdp\n  sync_each_batch: false\n")
    assert accelerator_config(off, 4) is None
    p = h.run("plan", h.write_spec(tmp_path / "d.yaml", tmp_path / "o", "distributed:\n  sync_each_batch: true\n"))
    assert p.returncode == 2 and "distributed.sync_each_batch" in p.stdout + p.stderr


def test_qlora_probe_runs_in_a_child_process():
    code = ("import sys; from distsft.launch.qlora_probe import probe; probe('cpu'); "
            "assert 'torch' not in sys.modules and 'bitsandbytes' not in sys.modules, 'probed in-process'; "
            "from distsft.errors import SpecError\n"
            "try:\n    probe('cuda')\nexcept SpecError as e:\n    print('ERR', e)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=h.env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ERR peft.method=qlora: bitsandbytes cannot run 4-bit quantization on cuda" in p.stdout, p.stdout


def test_universal_conversion_uses_more_than_one_worker(tmp_path):
    from distsft.checkpoint.universal import conversion_command
    cmd = conversion_command(tmp_path / "global_step2", tmp_path / "out", cpus=8)
    assert cmd[1:3] == ["-m", "deepspeed.checkpoint.ds_to_universal"]
    workers = int(cmd[cmd.index("--num_extract_workers") + 1])
    assert workers == 8 and int(cmd[cmd.index("--num_merge_workers") + 1]) == 2
    assert "--inject_missing_state" in cmd
    p = subprocess.run([*cmd[:3], "--help"], capture_output=True, text=True, env=h.env(), timeout=120)
    assert "--num_extract_workers" in p.stdout  # the flags exist in the installed DeepSpeed
