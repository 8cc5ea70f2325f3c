"""Rendered launcher files are accepted by DeepSpeed's and accelerate's own parsers, agree with the
plan, and the reference copies under accelerate_configs/ and deepspeed_configs/ are current.

Regenerate the reference copies after an intended change:  python -m distsft.launch.run_files --regen
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from distsft.plan.batch import batch_for
from distsft.launch.run_files import REFERENCE_CASES, launch_env, render_accelerate, render_reference, write_run_dir
from distsft.train.backend import render_deepspeed, resolve_precision
from distsft.config.spec import load_spec, validate

ROOT = Path(__file__).resolve().parents[1]

# name -> distributed section; all with micro batch 2 and global batch 96 (divisible at worlds 1-16 below).
BACKENDS = {
    "ddp": {"backend": "ddp"},
    "zero0": {"backend": "deepspeed", "zero_stage": 0},
    "zero1": {"backend": "deepspeed", "zero_stage": 1},
    "zero1_offload": {"backend": "deepspeed", "zero_stage": 1, "offload_optimizer": True},
    "zero2": {"backend": "deepspeed", "zero_stage": 2},
    "zero2_offload": {"backend": "deepspeed", "zero_stage": 2, "offload_optimizer": True},
    "zero3": {"backend": "deepspeed", "zero_stage": 3},
    "zero3_offload_opt": {"backend": "deepspeed", "zero_stage": 3, "offload_optimizer": True},
    "zero3_offload_all": {"backend": "deepspeed", "zero_stage": 3, "offload_optimizer": True,
                          "offload_params": True},
}
PRECISIONS = {"bf16": {"bf16": True}, "fp16": {"fp16": True}, "no": {"bf16": False}}
WORLDS = [(1, 1), (1, 2), (1, 8), (2, 8)]  # (nodes, gpus_per_node)


def make_spec(dist: dict, train: dict | None = None, nodes: int = 1, gpus: int = 8):
    return validate({"model": {"name_or_path": "m"}, "data": {"train_files": ["a.jsonl"]},
                     "train": {"per_device_train_batch_size": 2, "global_batch_size": 96, **(train or {})},
                     "distributed": {**dist, "nodes": nodes, "gpus_per_node": gpus}})


class FakeMpu:
    """Stands in for the many GPUs this machine does not have: DeepSpeedConfig takes the data-parallel
    world size from an mpu when one is given."""

    def __init__(self, world: int):
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world

    def get_data_parallel_rank(self) -> int:
        return 0


@pytest.fixture
def ds_config(monkeypatch):
    """DeepSpeed's own config class at a chosen world size, without an initialised process group."""
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig
    # DeepSpeedConfig asks for the global rank first and falls back to world size 1 when there is no
    # process group; rank 0 lets it go on to read the world size from the mpu.
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
    return lambda cfg, world: DeepSpeedConfig(json.loads(json.dumps(cfg)), mpu=FakeMpu(world))


def deepspeed_keys() -> set[str]:
    import deepspeed.runtime.constants as c
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION
    return {v for v in vars(c).values() if isinstance(v, str)} | {ZERO_OPTIMIZATION}


@pytest.mark.parametrize("cuda, bf16_ok, train, expected", [
    (True, True, {}, "bf16"),
    (True, False, {}, "no"),
    (False, False, {}, "no"),
    (False, False, {"bf16": True}, "bf16"),   # torch runs bf16 on CPU: an explicit request is honoured
    (True, True, {"bf16": False}, "no"),
    (True, True, {"fp16": True}, "fp16"),
    (False, False, {"fp16": True}, "fp16"),
])
def test_resolve_precision(cuda, bf16_ok, train, expected):
    assert resolve_precision(make_spec(BACKENDS["ddp"], train), cuda, bf16_ok) == expected


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name", list(BACKENDS))
def test_deepspeed_accepts_rendered_config(ds_config, name, precision):
    known = deepspeed_keys()
    for nodes, gpus in WORLDS:
        spec = make_spec(BACKENDS[name], PRECISIONS[precision], nodes, gpus)
        batch = batch_for(spec)
        cfg = render_deepspeed(spec, batch, precision)
        text = json.dumps(cfg)
        assert "auto" not in text
        assert not {"optimizer", "scheduler"} & cfg.keys()  # HF Trainer creates both
        assert set(cfg) <= known, set(cfg) - known
        c = ds_config(cfg, batch.world_size)
        assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == \
            (96, 2, 96 // (2 * nodes * gpus))
        assert c.train_batch_size == c.train_micro_batch_size_per_gpu * c.gradient_accumulation_steps * c.world_size
        assert c.zero_optimization_stage == spec.distributed.stage
        assert c.gradient_clipping == 1.0
        assert c.bfloat16_config.enabled == (precision == "bf16")
        assert c.float16_config.enabled == (precision == "fp16")
        if precision == "fp16":
            assert c.float16_config.loss_scale == 0  # dynamic loss scaling
        z = c.zero_config
        assert (z.offload_optimizer is not None) == spec.distributed.offload_optimizer
        assert (z.offload_param is not None) == spec.distributed.offload_params
        if z.offload_optimizer is not None:
            assert z.offload_optimizer.device == "cpu" and z.offload_optimizer.pin_memory
        if spec.distributed.stage == 3:
            assert z.gather_16bit_weights_on_model_save
    # DeepSpeed really checks the batch triple at the given world size.
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        ds_config(cfg, batch.world_size * 2)


def test_gradient_clipping_follows_max_grad_norm():
    spec = make_spec(BACKENDS["zero2"], {"max_grad_norm": 0.3})
    assert render_deepspeed(spec, batch_for(spec), "bf16")["gradient_clipping"] == 0.3


def launch_args(config_file: Path):
    """What `accelerate launch --config_file FILE train.py` makes of the file, up to torchrun's args
    and the ranks' environment (no process is started)."""
    import accelerate.utils.launch as launch_utils
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    with mock.patch.object(launch_utils, "is_port_in_use", lambda port: False):
        if args.use_deepspeed:
            fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            _, env = launch_utils.prepare_deepspeed_cmd_env(args)
        else:
            env = launch_utils.prepare_multi_gpu_env(args)
    return args, env


def deepspeed_plugin(env: dict[str, str]) -> tuple[int, dict]:
    """(zero stage, DeepSpeed config) of the plugin a rank builds from the launcher's environment; the
    plugin refuses settings that conflict with deepspeed_config_file (a mixed_precision key in the
    accelerate file, say)."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import unset_hf_deepspeed_config
    with mock.patch.dict(os.environ, {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
        plugin = DeepSpeedPlugin()
    # The plugin registers its config with transformers globally (ZeRO-3 init); later tests must not see it.
    unset_hf_deepspeed_config()
    return plugin.zero_stage, plugin.deepspeed_config


@pytest.mark.parametrize("cuda", [True, False])
@pytest.mark.parametrize("name, nodes, gpus", [("ddp", 1, 1), ("ddp", 1, 2), ("ddp", 2, 4), ("zero2", 1, 2),
                                               ("zero3", 1, 8), ("zero3_offload_all", 2, 8)])
def test_accelerate_loads_rendered_file(tmp_path, name, nodes, gpus, cuda):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    spec = make_spec(BACKENDS[name], {"bf16": True}, nodes, gpus)
    ip = "node-001" if nodes > 1 else None
    paths = write_run_dir(spec, tmp_path, cuda=cuda, bf16_supported=cuda, main_process_ip=ip)
    cfg = load_config_from_file(str(paths["accelerate"]))
    assert isinstance(cfg, ClusterConfig)
    world = nodes * gpus
    assert (cfg.num_processes, cfg.num_machines, cfg.machine_rank) == (world, nodes, 0)
    assert cfg.use_cpu is (not cuda)
    deepspeed = name != "ddp"
    expected = (DistributedType.DEEPSPEED if deepspeed else
                DistributedType.MULTI_GPU if world > 1 else DistributedType.NO)
    assert cfg.distributed_type == expected
    if not deepspeed:
        assert cfg.mixed_precision == "bf16"
        assert "deepspeed" not in paths
        if world > 1:
            args, _ = launch_args(paths["accelerate"])
            assert args.nproc_per_node == str(gpus)
        return
    assert cfg.mixed_precision is None  # precision lives in deepspeed.json only
    ds_file = Path(cfg.deepspeed_config["deepspeed_config_file"])
    assert ds_file.is_absolute() and ds_file == paths["deepspeed"]
    assert cfg.deepspeed_config["zero3_init_flag"] == (spec.distributed.stage == 3)
    args, env = launch_args(paths["accelerate"])
    assert args.nproc_per_node == str(gpus)
    stage, ds = deepspeed_plugin(env)
    assert stage == spec.distributed.stage
    assert ds["train_batch_size"] == 96 and ds["bf16"]["enabled"] is True


def test_deepspeed_file_agrees_with_plan(tmp_path):
    spec = make_spec(BACKENDS["zero3"], {"bf16": True}, 2, 4)
    paths = write_run_dir(spec, tmp_path, cuda=True, bf16_supported=True, main_process_ip="n1")
    ds = json.loads(paths["deepspeed"].read_text())
    b = batch_for(spec)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (b.global_batch_size, b.per_device_train_batch_size, b.gradient_accumulation_steps) == (96, 2, 6)


def test_run_yaml_pins_global_batch(tmp_path):
    spec = make_spec(BACKENDS["zero2"], {"global_batch_size": None, "gradient_accumulation_steps": 3}, 1, 4)
    # as load_spec leaves them (issue 24): paths absolute, so run.yaml names the same files from OUTPUT_DIR
    spec = spec.model_copy(update={"output_dir": str(tmp_path / "o"), "data": spec.data.model_copy(
        update={"train_files": [str(tmp_path / "a.jsonl")]})})
    paths = write_run_dir(spec, tmp_path / "run", cuda=False, bf16_supported=False)
    assert set(paths) == {"run", "accelerate", "deepspeed"}
    again = load_spec(paths["run"])
    assert (again.train.global_batch_size, again.train.gradient_accumulation_steps) == (24, None)
    assert again.model_copy(update={"train": spec.train}) == spec  # nothing else changed


def test_world_size_override(tmp_path):
    spec = make_spec(BACKENDS["zero2"], nodes=1, gpus=8)
    paths = write_run_dir(spec, tmp_path, cuda=False, bf16_supported=False, world_size=2)
    acc = yaml.safe_load(paths["accelerate"].read_text())
    ds = json.loads(paths["deepspeed"].read_text())
    assert acc["num_processes"] == 2 and ds["gradient_accumulation_steps"] == 24
    assert load_spec(paths["run"]).distributed.gpus_per_node == 2
    with pytest.raises(ValueError, match="multiple of distributed.nodes"):
        write_run_dir(make_spec(BACKENDS["ddp"], nodes=2, gpus=2), tmp_path, cuda=False, bf16_supported=False,
                      world_size=3)


def test_ports():
    spec = make_spec(BACKENDS["ddp"], nodes=1, gpus=2)
    b = batch_for(spec)
    assert "main_process_port" not in render_accelerate(spec, b, "no", cuda=False, deepspeed_config_file=None)
    assert render_accelerate(spec, b, "no", cuda=False, deepspeed_config_file=None,
                             main_process_port=29611)["main_process_port"] == 29611
    spec = make_spec({"backend": "ddp", "main_process_port": 29777}, nodes=1, gpus=2)
    assert render_accelerate(spec, b, "no", cuda=False, deepspeed_config_file=None)["main_process_port"] == 29777


def test_deepspeed_needs_a_file():
    spec = make_spec(BACKENDS["zero2"])
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        render_accelerate(spec, batch_for(spec), "bf16", cuda=True, deepspeed_config_file=None)


def test_launch_env():
    assert launch_env(make_spec(BACKENDS["ddp"]), cuda=False) == {"ACCELERATE_USE_CPU": "true"}
    assert launch_env(make_spec(BACKENDS["ddp"]), cuda=True) == {}
    assert launch_env(make_spec(BACKENDS["zero2"]), cuda=False) == {}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_reference_files_are_current(name):
    acc, ds = render_reference(ROOT, name)
    assert (ROOT / "accelerate_configs" / f"{name}.yaml").read_text() == acc, \
        "stale reference: run `python -m distsft.launch.run_files --regen`"
    ds_path = ROOT / "deepspeed_configs" / f"{name}.json"
    if ds is None:
        assert not ds_path.exists()
    else:
        assert ds_path.read_text() == ds, "stale reference: run `python -m distsft.launch.run_files --regen`"


def test_no_orphan_reference_files():
    names = set(REFERENCE_CASES)
    assert {p.stem for p in (ROOT / "accelerate_configs").glob("*.yaml")} == names
    assert {p.stem for p in (ROOT / "deepspeed_configs").glob("*.json")} <= names


# Sequence-parallel references (*_sp) leave train_batch_size to accelerate: test_seqpar_plan checks them.
@pytest.mark.parametrize("name", [n for n in REFERENCE_CASES
                                  if n != "ddp" and not n.startswith("fsdp") and not n.endswith("_sp")])
def test_reference_deepspeed_files_load(ds_config, name, monkeypatch):
    monkeypatch.chdir(ROOT)  # the reference files point at deepspeed_configs/ relatively
    acc = yaml.safe_load((ROOT / "accelerate_configs" / f"{name}.yaml").read_text())
    cfg = json.loads(Path(acc["deepspeed_config"]["deepspeed_config_file"]).read_text())
    ds_config(cfg, acc["num_processes"])
    _, env = launch_args(ROOT / "accelerate_configs" / f"{name}.yaml")
    assert deepspeed_plugin(env)[1]["train_batch_size"] == 128


def test_two_node_reference_has_multinode_fields():
    acc = yaml.safe_load((ROOT / "accelerate_configs" / "two_node.yaml").read_text())
    assert (acc["num_machines"], acc["num_processes"], acc["machine_rank"]) == (2, 16, 0)
    assert (acc["main_process_ip"], acc["main_process_port"]) == ("node-001", 29500)
    assert acc["rdzv_backend"] == "static" and acc["same_network"] is True
    assert acc["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"  # torchrun, not pdsh
    args, _ = launch_args(ROOT / "accelerate_configs" / "two_node.yaml")
    endpoint = getattr(args, "rdzv_endpoint", "") or f"{args.master_addr}:{args.master_port}"
    assert (args.nnodes, args.nproc_per_node, args.node_rank, endpoint) == ("2", "8", 0, "node-001:29500")


def test_multinode_rank_and_address_from_command_line():
    """Rendered without an address (it is known only inside the job), the launch passes it."""
    spec = make_spec(BACKENDS["zero3"], nodes=2, gpus=8)
    acc = render_accelerate(spec, batch_for(spec), "bf16", cuda=True, deepspeed_config_file="/x.json")
    assert "main_process_ip" not in acc and acc["main_process_port"] == 29500


PROBE = """
import os, torch, torch.distributed as dist
from accelerate import Accelerator, PartialState
if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    PartialState(backend="gloo")
acc = Accelerator()
total = acc.reduce(torch.tensor([acc.process_index + 1.0]), "sum").item()
print(f"rank={acc.process_index} world={acc.num_processes} type={acc.distributed_type.value} "
      f"backend={dist.get_backend()} sum={total}", flush=True)
acc.wait_for_everyone()
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_rendered_file_launches_two_cpu_ranks(tmp_path, name):
    spec = make_spec(BACKENDS[name], {"global_batch_size": 4}, 1, 2)
    paths = write_run_dir(spec, tmp_path / "run", cuda=False, bf16_supported=False, main_process_port=free_port())
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, **launch_env(spec, cuda=False), "DS_ACCELERATOR": "cpu"}
    accelerate = Path(sys.executable).with_name("accelerate")
    out = subprocess.run([str(accelerate), "launch", "--config_file", str(paths["accelerate"]),
                          str(tmp_path / "probe.py")], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    kind = "DEEPSPEED" if name == "zero2" else "MULTI_CPU"
    for rank in (0, 1):
        assert f"rank={rank} world=2 type={kind} backend=gloo sum=3.0" in out.stdout, out.stdout


# ---------------------------------------------------------------- FSDP2

@pytest.mark.parametrize("offload, reshard, ckpt", [(False, True, True), (True, False, False)])
def test_fsdp_file_reaches_accelerates_fsdp2_plugin(tmp_path, offload, reshard, ckpt):
    """The rendered FSDP section goes through accelerate's launcher into the environment of the ranks
    and from there into accelerate's own FullyShardedDataParallelPlugin, with the layer class read from
    the model's config (the tiny Llama here)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    spec = validate({"model": {"name_or_path": str(ROOT / "examples" / "tiny-llama")},
                     "data": {"train_files": ["a.jsonl"]},
                     "train": {"per_device_train_batch_size": 2, "global_batch_size": 96, "bf16": True,
                               "gradient_checkpointing": ckpt},
                     "distributed": {"backend": "fsdp", "gpus_per_node": 8, "offload_params": offload,
                                     "reshard_after_forward": reshard}})
    paths = write_run_dir(spec, tmp_path, cuda=True, bf16_supported=True)
    assert set(paths) == {"run", "accelerate"}  # no deepspeed.json
    cfg = load_config_from_file(str(paths["accelerate"]))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.mixed_precision == "bf16"
    args, env = launch_args(paths["accelerate"])
    assert args.nproc_per_node == "8"
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    with mock.patch.dict(os.environ, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.reshard_after_forward is reshard
    assert (type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy") is offload  # not the no-op OffloadPolicy
    assert plugin.activation_checkpointing is ckpt
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)


def test_one_process_fsdp_still_starts_through_torchrun(tmp_path):
    spec = make_spec({"backend": "fsdp"}, nodes=1, gpus=1)
    acc = render_accelerate(spec, batch_for(spec), "no", cuda=False, deepspeed_config_file=None)
    assert acc["distributed_type"] == "FSDP" and "fsdp_transformer_layer_cls_to_wrap" not in acc["fsdp_config"]


def test_layer_classes_from_no_split_modules_or_the_longest_module_list():
    import torch.nn as nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.train.fsdp import layer_classes
    cfg = AutoConfig.for_model("qwen2", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    assert layer_classes(AutoModelForCausalLM.from_config(cfg)) == ["Qwen2DecoderLayer"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    class Custom(nn.Module):  # no _no_split_modules: the blocks of the longest ModuleList
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2)])
            self.blocks = nn.ModuleList([Block() for _ in range(3)])

    assert layer_classes(Custom()) == ["Block"]
