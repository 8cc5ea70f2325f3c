"""`distributed.sequence_parallel_size` in the spec, `plan` and `render` (no ranks): bad input exits 2
with one line naming the key; the plan shows the layout; render writes accelerate's parallelism config."""

from __future__ import annotations

import json

import pytest
import yaml

import helpers as h
from distsft.config import seqpar as rules

DS = "distributed:\n  backend: deepspeed\n  zero_stage: 3\n"


def _plan(tmp_path, *args, extra=DS):
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "out", extra)
    return h.run("plan", spec, "--no-data", *args)


def _one_error(p, *needles):
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    err = p.stderr.strip().splitlines()
    assert any(all(n in line for n in needles) for line in err), p.stderr


@pytest.mark.parametrize("args,needles", [
    (["--gpus", "2", "distributed.sequence_parallel_size=3"],
     ["distributed.sequence_parallel_size=3", "world size 2"]),
    (["--gpus", "8", "distributed.sequence_parallel_size=8"],
     ["distributed.sequence_parallel_size=8", "4 attention heads"]),
    (["--gpus", "2", "distributed.sequence_parallel_size=2", "model.attn_implementation=eager"],
     ["model.attn_implementation=eager", "sequence_parallel_size"]),
    (["--gpus", "2", "distributed.sequence_parallel_size=2", "logging.generation_steps=2"],
     ["logging.generation_steps", "sequence_parallel_size"]),
])
def test_bad_layouts_exit_2_naming_the_key(tmp_path, args, needles):
    _one_error(_plan(tmp_path, *args), *needles)


def test_ddp_has_no_sequence_parallelism(tmp_path):
    p = _plan(tmp_path, "--gpus", "2", "distributed.sequence_parallel_size=2", extra="")
    _one_error(p, "distributed.sequence_parallel_size=2", "backend: ddp", "deepspeed", "fsdp")


def test_fsdp_ring_attention_refuses_packing(tmp_path):
    p = _plan(tmp_path, "--gpus", "2", "distributed.sequence_parallel_size=2",
              extra="distributed:\n  backend: fsdp\n")
    _one_error(p, "data.packing", "sequence_parallel_size", "attend to each other")
    ok = _plan(tmp_path, "--gpus", "2", "distributed.sequence_parallel_size=2", "data.packing=false",
               extra="distributed:\n  backend: fsdp\n")
    assert ok.returncode == 0, ok.stderr


def test_global_batch_counts_data_parallel_groups(tmp_path):
    p = _plan(tmp_path, "--gpus", "4", "distributed.sequence_parallel_size=2", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    # global 8 = micro 2 x accum 2 x (4 GPUs / 2)
    assert (d["sequence_parallel_size"], d["data_parallel_size"]) == (2, 2)
    assert d["gradient_accumulation_steps"] == 2 and d["global_batch_size"] == 8
    assert d["tokens_per_gpu_per_micro_batch"] == 2 * 256 // 2
    assert d["memory"]["activations_gb"] < _activations(tmp_path, "1")  # the group shares a row's activations
    table = _plan(tmp_path, "--gpus", "4", "distributed.sequence_parallel_size=2").stdout
    assert "sequence parallel" in table and "data parallel" in table and "× 2 (data-parallel" in table


def _activations(tmp_path, sp):
    p = _plan(tmp_path, "--gpus", "4", f"distributed.sequence_parallel_size={sp}", "--json")
    return json.loads(p.stdout)["memory"]["activations_gb"]


def test_indivisible_global_batch_names_the_data_parallel_degree(tmp_path):
    p = _plan(tmp_path, "--gpus", "2", "distributed.sequence_parallel_size=2", "train.global_batch_size=3")
    _one_error(p, "train.global_batch_size=3")


def test_position_range_warning_and_rope_override(tmp_path):
    p = _plan(tmp_path, "--gpus", "2", "data.max_length=4096")
    assert "1024 positions" in p.stdout and "rope_parameters" in p.stdout, p.stdout
    scaled = _plan(tmp_path, "--gpus", "2", "data.max_length=4096",
                   "model.rope_parameters={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 1024}")
    assert scaled.returncode == 0, scaled.stderr
    assert "1024 positions" not in scaled.stdout


def test_render_writes_the_parallelism_config(tmp_path):
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "out", DS)
    h.run("render", spec, "--gpus", "4", "distributed.sequence_parallel_size=2", "--out", tmp_path / "rd",
          check=True)
    acc = yaml.safe_load((tmp_path / "rd" / "accelerate.yaml").read_text())
    assert acc["parallelism_config"]["parallelism_config_sp_size"] == 2
    assert acc["parallelism_config"]["parallelism_config_sp_backend"] == "deepspeed"
    ds = json.loads((tmp_path / "rd" / "deepspeed.json").read_text())
    # 8 = micro 2 x accum 2 x (4 GPUs / 2). HF's consistency check would count every GPU of a group as a
    # replica (world x micro x accum), so train_batch_size is left to accelerate, which sets it to
    # micro x accum x data-parallel degree before DeepSpeed starts.
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == 8
    assert "train_batch_size" not in ds
    run = yaml.safe_load((tmp_path / "rd" / "run.yaml").read_text())
    assert run["distributed"]["sequence_parallel_size"] == 2


def test_rules_units():
    assert rules.padded_length(255, 2) == 256 and rules.padded_length(256, 4) == 256
    assert rules.layout_errors(2, 4, heads=4, kv_heads=2) == []
    assert rules.layout_errors(4, 4, heads=8, kv_heads=2) == []  # DeepSpeed replicates kv heads
    assert rules.layout_errors(4, 4, heads=8, kv_heads=3) != []
    f = rules.figures(4, 8, 1, 32768)
    assert f == {"sequence_parallel_size": 4, "data_parallel_size": 2, "tokens_per_gpu_per_micro_batch": 8192,
                 "activation_share": 0.25}
    assert rules.position_warning(2048, 1024, None)
    assert rules.position_warning(2048, 1024, {"rope_type": "yarn", "factor": 2.0}) is None
    assert "factor" in rules.position_warning(4096, 1024, {"rope_type": "yarn", "factor": 2.0})


def test_sp_reference_files_describe_the_planned_global_batch(monkeypatch):
    """accelerate_configs/zero3_sp.yaml (kept equal to the rendering by test_render): accelerate's
    ParallelismConfig from its variables, and the global batch accelerate gives DeepSpeed, micro x accum
    x data-parallel degree, is the plan's."""
    from distsft.config.spec import load_spec
    from distsft.plan.batch import batch_for
    acc = yaml.safe_load((h.ROOT / "accelerate_configs" / "zero3_sp.yaml").read_text())
    ds = json.loads((h.ROOT / acc["deepspeed_config"]["deepspeed_config_file"]).read_text())
    pc = acc["parallelism_config"]
    spec = load_spec(h.ROOT / "examples" / "configs" / "zero3_sp.yaml")
    assert pc["parallelism_config_sp_size"] == spec.distributed.sequence_parallel_size == 4
    dp = acc["num_processes"] // pc["parallelism_config_sp_size"]
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp \
        == batch_for(spec).global_batch_size == 128
    from accelerate.parallelism_config import ParallelismConfig
    for key, value in pc.items():  # what `accelerate launch` exports from the file
        monkeypatch.setenv(key.upper(), str(value))
    made = ParallelismConfig()
    assert made.sp_size == 4 and made.sp_backend == "deepspeed" and made.sp_handler is not None


def test_ring_attention_on_this_cpu_machine_stops_before_any_rank(tmp_path):
    """FSDP2's ring attention has no CPU kernel: `distsft run` says so and what works here (exit 2)."""
    from distsft.runtime.hardware import cuda_info
    if cuda_info()[0]:
        pytest.skip("a CUDA machine runs it")
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "out", "distributed:\n  backend: fsdp\n")
    p = h.run("run", spec, "--gpus", "2", "distributed.sequence_parallel_size=2", "data.packing=false")
    _one_error(p, "sequence_parallel_size=2", "CUDA", "backend: deepspeed")
