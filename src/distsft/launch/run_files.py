"""Render a run's launcher files: accelerate.yaml (DDP, DeepSpeed or FSDP2), deepspeed.json and the
resolved run.yaml.

Every number in these files is explicit and comes from `plan.batch_for`: no "auto" that HF or DeepSpeed
would fill in later, so what the plan printed is what runs, and DeepSpeed's own batch check
(train_batch_size == micro × accumulation × world) guards the arithmetic a second time.

The reference copies under accelerate_configs/ and deepspeed_configs/ are this module's output for the
specs in examples/configs/; regenerate them with `python -m distsft.launch.run_files --regen` from the repo root.

CPU machines (verified with accelerate 1.15 / deepspeed 0.19.8 / transformers 5.23): `accelerate launch`
starts N ranks only through torchrun, i.e. distributed_type MULTI_GPU or DEEPSPEED (MULTI_CPU goes to the
single-process launcher unless mpirun is configured). `use_cpu: true` in the file does not reach those
ranks; without CUDA each rank must ask for the CPU itself, or accelerate sees no backend and every rank
believes it is alone (HF Trainer then stops on DeepSpeed's batch-size mismatch):
  * DDP: ACCELERATE_USE_CPU=true in the environment (`launch_env`) or TrainingArguments(use_cpu=True):
    MULTI_CPU over gloo;
  * DeepSpeed: TrainingArguments(use_cpu=True) keeps DeepSpeed (HF hands its plugin to the Accelerator);
    a bare `Accelerator()` needs `PartialState(backend="gloo")` first, as ACCELERATE_USE_CPU would
    switch DeepSpeed off for it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from distsft.config.spec import RunSpec, dump_spec, load_spec
from distsft.runtime import ports
from distsft.plan.batch import Batch, batch_for, pin_global_batch
from distsft.train.backend import render_deepspeed, resolve_precision
from distsft import rundir


# name -> extra keyword arguments for render_accelerate; the specs are examples/configs/<name>.yaml.
REFERENCE_CASES: dict[str, dict[str, Any]] = {
    "ddp": {},
    "zero2": {},
    "zero3": {},
    "zero3_offload": {},
    # FSDP2 on Llama-3.1-8B: the layer class its config names, as write_run_dir finds it where the model
    # config is readable (the references are rendered without the hub).
    "fsdp": {"fsdp_layers": ["LlamaDecoderLayer"]},
    "fsdp_offload": {"fsdp_layers": ["LlamaDecoderLayer"]},
    # Rendered for the first node; on a cluster the launch passes --machine_rank/--main_process_ip.
    "two_node": {"machine_rank": 0, "main_process_ip": "node-001"},
    # Long context: Ulysses sequence parallelism over groups of 4 GPUs under ZeRO-3.
    "zero3_sp": {},
}


def render_accelerate(spec: RunSpec, batch: Batch, precision: str, *, cuda: bool,
                      deepspeed_config_file: str | None, machine_rank: int = 0,
                      main_process_ip: str | None = None, main_process_port: int | None = None,
                      fsdp_layers: list[str] | None = None) -> dict[str, Any]:
    """An `accelerate launch --config_file` file. num_processes is the total over all machines
    (accelerate starts num_processes // num_machines per node). `fsdp_layers`: the classes FSDP2 wraps
    (fsdp.layer_classes_for); without them accelerate takes the model's `_no_split_modules`."""
    d = spec.distributed
    if batch.world_size % d.nodes:
        raise ValueError(f"world size {batch.world_size} is not a multiple of distributed.nodes={d.nodes}")
    deepspeed = d.backend == "deepspeed"
    if deepspeed and not deepspeed_config_file:
        raise ValueError("the deepspeed backend needs deepspeed_config_file")
    if deepspeed:
        dist_type = "DEEPSPEED"
    elif d.backend == "fsdp":
        # Also for one process: FSDP2 needs a process group, which torchrun (the FSDP launcher) provides.
        dist_type = "FSDP"
    else:
        # MULTI_GPU also on CPU: it is the type that makes accelerate start the ranks with torchrun.
        dist_type = "MULTI_GPU" if batch.world_size > 1 else "NO"
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": dist_type,
        "num_machines": d.nodes,
        "num_processes": batch.world_size,
        "machine_rank": machine_rank,
        "gpu_ids": "all",
        # Only sizes the launcher's OMP threads; ranks learn about the CPU from launch_env / use_cpu.
        "use_cpu": not cuda,
        # Static rendezvous at main_process_ip:port with --node_rank = machine_rank. (accelerate 1.15 reads
        # same_network only from its command line; without it the same address goes to torchrun as
        # --rdzv_endpoint instead of --master_addr, which static rendezvous treats alike.)
        "rdzv_backend": "static",
        "same_network": True,
        "debug": False,
    }
    port = main_process_port or (ports.wanted(d.main_process_port) if d.nodes > 1 or d.main_process_port else None)
    if main_process_ip:
        cfg["main_process_ip"] = main_process_ip
    if port:
        cfg["main_process_port"] = port
    if deepspeed:
        # No mixed_precision key: with deepspeed_config_file accelerate rejects any precision given in
        # the accelerate file (even 'no'); deepspeed.json carries bf16/fp16.
        cfg["deepspeed_config"] = {"deepspeed_config_file": deepspeed_config_file,
                                   "zero3_init_flag": d.stage == 3}
        if d.nodes > 1:
            # One torchrun per node (what SLURM starts) instead of DeepSpeed's pdsh/ssh fan-out.
            cfg["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
    else:
        cfg["mixed_precision"] = precision
    if d.backend == "fsdp":
        from distsft.train.fsdp import accelerate_fsdp_config
        cfg["fsdp_config"] = accelerate_fsdp_config(spec, fsdp_layers)
    if d.sequence_parallel_size > 1:
        cfg["parallelism_config"] = parallelism_section(spec, batch)
    return cfg


def parallelism_section(spec: RunSpec, batch: Batch) -> dict[str, Any]:
    """accelerate's `parallelism_config` for `distributed.sequence_parallel_size` (accelerate turns it into
    PARALLELISM_CONFIG_* variables). The ranks also pass the same ParallelismConfig to TrainingArguments
    (train.seqpar), which wins over the variables, so ranks started without this file (SLURM, torchrun)
    run the same layout. Ulysses under DeepSpeed; FSDP2's ring attention (cp) otherwise."""
    S, prefix = spec.distributed.sequence_parallel_size, "parallelism_config_"
    if spec.distributed.backend == "deepspeed":
        out = {"sp_size": S, "sp_backend": "deepspeed", "sp_seq_length_is_variable": True}
        if spec.model.attn_implementation != "auto":  # auto is resolved on the ranks' machine
            out["sp_attn_implementation"] = spec.model.attn_implementation
    else:
        out = {"dp_shard_size": batch.data_parallel_size, "cp_size": S, "cp_backend": "torch"}
    return {prefix + k: v for k, v in out.items()}


def launch_env(spec: RunSpec, cuda: bool) -> dict[str, str]:
    """Environment for `accelerate launch` with a rendered file (see the module docstring)."""
    if not cuda and spec.distributed.backend == "ddp":
        return {"ACCELERATE_USE_CPU": "true"}
    return {}


def accelerate_text(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def deepspeed_text(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, indent=2) + "\n"


def write_run_dir(spec: RunSpec, out_dir: str | Path, *, cuda: bool, bf16_supported: bool,
                  world_size: int | None = None, machine_rank: int = 0, main_process_ip: str | None = None,
                  main_process_port: int | None = None) -> dict[str, Path]:
    """Write run.yaml, accelerate.yaml and (DeepSpeed) deepspeed.json into out_dir; return their paths
    under the keys "run", "accelerate", "deepspeed". `world_size` replaces the spec's GPU count (kept
    as gpus_per_node = world_size / nodes, so run.yaml describes the run that was launched)."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if world_size is not None:
        nodes = spec.distributed.nodes
        if world_size % nodes:
            raise ValueError(f"world size {world_size} is not a multiple of distributed.nodes={nodes}")
        spec = spec.model_copy(deep=True)
        spec.distributed.gpus_per_node = world_size // nodes
    batch = batch_for(spec)
    precision = resolve_precision(spec, cuda, bf16_supported)
    paths = {"run": out / rundir.RUN_YAML, "accelerate": out / rundir.ACCELERATE_YAML}
    # The global batch, not the accumulation, is recorded so a resume on another GPU count keeps it.
    dump_spec(pin_global_batch(spec), paths["run"])
    if spec.train.per_device_train_batch_size == "auto" and out == Path(spec.output_dir).resolve():
        # run.yaml holds the number; the record tells the ranks it is an estimate to confirm on the GPU
        # (`render --out` elsewhere writes nothing into the output directory).
        from distsft.plan import fit
        world = spec.distributed.nodes * spec.distributed.gpus_per_node
        if fit.probed_micro(spec, world) is None:
            m = batch.per_device_train_batch_size
            fit.record_auto(spec, world, m, m, probed=False)
    # Where the trained chat template comes from (it is saved as chat_template.jinja with the model).
    from distsft.config.templates import describe
    note = describe(spec.data.chat_template, spec.model.name_or_path).replace("\n", " ")
    paths["run"].write_text(f"# chat template: {note}\n" + paths["run"].read_text())
    ds_file = None
    if spec.distributed.backend == "deepspeed":
        paths["deepspeed"] = out / rundir.DEEPSPEED_JSON
        paths["deepspeed"].write_text(deepspeed_text(render_deepspeed(spec, batch, precision)))
        ds_file = str(paths["deepspeed"])
    layers = None
    if spec.distributed.backend == "fsdp":
        from distsft.train.fsdp import layer_classes_for
        layers = layer_classes_for(spec)
    acc = render_accelerate(spec, batch, precision, cuda=cuda, deepspeed_config_file=ds_file,
                            machine_rank=machine_rank, main_process_ip=main_process_ip,
                            main_process_port=main_process_port, fsdp_layers=layers)
    paths["accelerate"].write_text(accelerate_text(acc))
    return paths


def render_reference(root: Path, name: str) -> tuple[str, str | None]:
    """(accelerate.yaml text, deepspeed.json text or None) of a reference case, as on a bf16 GPU node."""
    spec = load_spec(root / "examples" / "configs" / f"{name}.yaml")
    batch = batch_for(spec)
    precision = resolve_precision(spec, cuda=True, bf16_supported=True)
    ds = None
    ds_file = None
    if spec.distributed.backend == "deepspeed":
        ds = deepspeed_text(render_deepspeed(spec, batch, precision))
        ds_file = f"deepspeed_configs/{name}.json"  # relative, so the copies do not depend on a checkout
    acc = render_accelerate(spec, batch, precision, cuda=True, deepspeed_config_file=ds_file,
                            **REFERENCE_CASES[name])
    return accelerate_text(acc), ds


def regenerate_references(root: Path) -> list[Path]:
    written = []
    for name in REFERENCE_CASES:
        acc, ds = render_reference(root, name)
        p = root / "accelerate_configs" / f"{name}.yaml"
        p.parent.mkdir(exist_ok=True)
        p.write_text(acc)
        written.append(p)
        if ds is not None:
            q = root / "deepspeed_configs" / f"{name}.json"
            q.parent.mkdir(exist_ok=True)
            q.write_text(ds)
            written.append(q)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distsft.launch.run_files")
    parser.add_argument("--regen", action="store_true", help="rewrite accelerate_configs/ and deepspeed_configs/")
    parser.add_argument("--root", default=".", help="repository root (default: the current directory)")
    args = parser.parse_args(argv)
    if not args.regen:
        parser.error("nothing to do: pass --regen")
    for p in regenerate_references(Path(args.root)):
        print(p)


if __name__ == "__main__":
    main()
